"""tfds builder for a user's image folders (one sub-folder per class); array_record, no TensorFlow.

Every image is decoded with Pillow when the dataset is prepared (unreadable files are skipped and
counted). A JPEG or PNG that decodes straight to RGB or grey (no EXIF rotation, one frame) is
stored as the file's own bytes: the pipeline's Pillow (the same pinned version) decodes exactly
the pixels checked here, and JPEG decodes ~5x faster than PNG. Anything else (palette, alpha,
CMYK, 16-bit, EXIF-rotated, BMP / GIF / WebP) is converted to RGB and stored as lossless PNG.
Nothing is resized. Records: `{"image": encoded bytes, "height", "width", "label", "id", "file"}`
with `id` the position of the file in the split's sorted file list.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import ExifTags, Image, ImageOps

from sft_jax.data.builders import stratified_split
from sft_jax.data.files import DataFileError

IMAGE_FOLDER_SPLIT_SEED = 20240716
IMAGE_FOLDER_HELD_OUT = 0.1  # of each class, for a validation / test split without a folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SHOW_SKIPPED = 5  # skipped files named in the log line
_LOG = logging.getLogger(__name__)


def _file_error(path: Any, problem: str) -> DataFileError:
    return DataFileError(path, None, None, problem)


def _is_hidden(rel: pathlib.PurePath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _walk(class_dir: pathlib.Path) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` under `class_dir`, hidden entries skipped, following linked
    sub-folders; a folder reached again (a link loop, or two links to one folder) is listed
    once and logged."""
    seen: set[str] = set()
    for root, dirs, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            _LOG.warning("%s: skipped, the same folder as %s was already listed", root, real)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield root, names


def _class_files(class_dir: pathlib.Path) -> tuple[list[str], int]:
    """(sorted image paths relative to `class_dir`, number of non-image files ignored)."""
    images, other = [], 0
    for root, names in _walk(class_dir):
        for name in names:
            rel = pathlib.Path(root, name).relative_to(class_dir)
            if _is_hidden(rel):
                continue
            if rel.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(rel.as_posix())
            else:
                other += 1
    return sorted(images), other


def scan_image_folder(root: str | pathlib.Path, what: str = "train_dir") -> list[tuple[str, str]]:
    """Lists a folder of class sub-folders (hidden ones, like `.ipynb_checkpoints`, skipped).

    Args:
      root: the folder; each sub-folder is a class, holding images at any depth (linked
        sub-folders are followed; a folder reached twice, as by a link loop, is listed once).
      what: the config key of `root`, for messages.

    Returns:
      `(file relative to root, class name)` for every image, sorted by class, then path.

    Raises:
      DataFileError: naming the folder: missing, no class folders, an empty class folder.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise _file_error(root, f"{what} is not a directory")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        raise _file_error(
            root,
            f"no class folders: {what} must hold one sub-folder per class (e.g. {root}/cat/1.jpg)",
        )
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        _LOG.warning("%s: %d files outside class folders ignored (%s)", root, len(loose), loose[:3])
    items, ignored = [], 0
    for name in classes:
        files, other = _class_files(root / name)
        if not files:
            raise _file_error(
                root / name,
                f"class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})",
            )
        items += [(f"{name}/{f}", name) for f in files]
        ignored += other
    if ignored:
        _LOG.warning("%s: %d files without an image extension ignored", root, ignored)
    return items


def decode_image(data: bytes) -> tuple[np.ndarray, str, bool]:
    """Decodes one image file's bytes with Pillow into uint8 RGB [H, W, 3].

    EXIF orientation is applied (the image as viewers show it; a malformed EXIF block, as some
    tools write, is ignored); animated GIF / WebP / PNG give their first frame. Other modes are
    converted with Pillow's `convert("RGB")`: grey is repeated, palettes are looked up, alpha is
    dropped (as torchvision's loader does), CMYK is converted. 16-bit grey is scaled to 8 bits
    (v / 257, rounded) rather than clipped.

    Returns:
      (pixels, the file's original mode (e.g. "L", "P", "RGBA"), whether `data` itself is a
      JPEG or PNG that decodes to these pixels with no conversion but grey -> RGB).

    Raises:
      OSError / ValueError / SyntaxError (Pillow's): truncated or unreadable data.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated data
        mode = im.mode
        try:
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        except (OSError, ValueError, SyntaxError):  # malformed EXIF (the pixels are fine)
            orientation = 1
        rotated = orientation != 1
        as_is = (
            im.format in ("JPEG", "PNG")
            and mode in ("RGB", "L")
            and not rotated
            and getattr(im, "n_frames", 1) == 1
        )
        if rotated:
            im = ImageOps.exif_transpose(im)
        if mode.startswith("I;16"):
            grey = np.asarray(im, dtype=np.uint16).astype(np.uint32)
            im = Image.fromarray(((grey + 128) // 257).astype(np.uint8))
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return rgb, mode, as_is


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of uint8 [H, W, 3] (zlib level 1: encodes fast, decodes as fast)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _folder_digest(dirs: Mapping[str, pathlib.Path], items: Mapping[str, list]) -> str:
    """Hash of every listed file's path, size and modification time (not its bytes); a file
    that cannot be read (a broken link) counts as missing, and preparation skips it as it skips
    an undecodable image."""
    digest = hashlib.sha256()
    for split, root in dirs.items():
        digest.update(f"{split}:{root.resolve()}\n".encode())
        for rel, _ in items[split]:
            try:
                st = (root / rel).stat()
                digest.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{rel}:missing\n".encode())
    return digest.hexdigest()


def _check_same_classes(dirs: Mapping[str, pathlib.Path], items: Mapping[str, list]) -> list[str]:
    names = {split: sorted({label for _, label in items[split]}) for split in items}
    for split, classes in names.items():
        if classes != names["train"]:
            extra = sorted(set(classes) - set(names["train"]))
            missing = sorted(set(names["train"]) - set(classes))
            raise _file_error(
                dirs[split],
                f"{split}_dir has other class folders than train_dir {dirs['train']}: "
                f"not in train_dir: {extra}; missing here: {missing}",
            )
    return names["train"]


def _warn_classes_not_held_out(
    root: pathlib.Path, train: list, parts: Mapping[str, list[int]]
) -> None:
    """Warns naming the classes (with their image counts) that give the splits held out of
    train_dir no image: `round(n * IMAGE_FOLDER_HELD_OUT)` is 0 for fewer than 6 images."""
    held_out = [k for k in parts if k != "train"]
    counts = collections.Counter(label for _, (_, label) in train)
    present = {k: {train[p][1][1] for p in parts[k]} for k in held_out}
    short = [
        f"{c} ({n} images)"
        for c, n in sorted(counts.items())
        if any(c not in present[k] for k in held_out)
    ]
    if not short:
        return
    more = f" and {len(short) - _SHOW_SKIPPED} more" if len(short) > _SHOW_SKIPPED else ""
    _LOG.warning(
        "%s: %d of %d classes have too few images to hold out %.0f%% of each for the %s "
        "split, so they have no image there: %s%s; pass %s to evaluate on images of your own",
        root,
        len(short),
        len(counts),
        100 * IMAGE_FOLDER_HELD_OUT,
        " / ".join(held_out),
        ", ".join(short[:_SHOW_SKIPPED]),
        more,
        " / ".join(f"data.{k}_dir" for k in held_out),
    )


class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """A user's image folders (`root/<class>/**/<image>`), one sub-folder per class.

    The folders are listed and checked when the builder is constructed; images are decoded
    when it prepares. Label names are the sorted class folder names. A split without a folder
    (`validation_dir` / `test_dir` not given) is split off train: `IMAGE_FOLDER_HELD_OUT` of
    each class by the fixed seeded `stratified_split` (by listing position, decided before
    decoding), rounded: a class of fewer than 6 images gives none, and a warning names it.
    How images are stored: see the module docstring (exact pixels, original size). Files
    Pillow cannot decode (truncated, not an image) are skipped: one warning per split names
    the first few and the count, and `info.metadata["skipped"]` keeps the list. The config
    name hashes every file's path, size and modification time, so changed folders prepare
    into a fresh directory.
    """

    name = "image_folders"  # not "image_folder": tfds' own ImageFolder uses that name
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code

    def __init__(
        self,
        *,
        train_dir: str | pathlib.Path,
        validation_dir: str | pathlib.Path | None = None,
        test_dir: str | pathlib.Path | None = None,
        data_dir: str | pathlib.Path | None = None,
    ):
        """Lists and checks the folders; raises `DataFileError` on bad structure."""
        given = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        self.dirs = {k: pathlib.Path(v) for k, v in given.items() if v}
        self.items = {k: scan_image_folder(v, f"{k}_dir") for k, v in self.dirs.items()}
        self.label_names = _check_same_classes(self.dirs, self.items)
        digest = _folder_digest(self.dirs, self.items)
        config = tfds.core.BuilderConfig(
            name=f"sha256_{digest[:16]}",
            description=", ".join(f"{k}_dir={v}" for k, v in self.dirs.items()),
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # Pickling re-runs __init__ with these (DatasetBuilder.__setstate__).
        self._original_state = dict(
            train_dir=train_dir, validation_dir=validation_dir, test_dir=test_dir, data_dir=data_dir
        )

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # JPEG / PNG
                "height": np.int64,
                "width": np.int64,
                "label": tfds.features.ClassLabel(names=self.label_names),
                "id": np.int64,
                "file": tfds.features.Text(),  # relative to the split's folder
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image classification examples from user folders (JPEG / PNG bytes).",
            features=features,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(skipped={}, converted={}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        train = list(enumerate(self.items["train"]))  # (id, (file, class))
        fractions = {"train": 1.0}
        fractions.update(
            {k: IMAGE_FOLDER_HELD_OUT for k in ("validation", "test") if k not in self.dirs}
        )
        labels = [self.label_names.index(label) for _, (_, label) in train]
        parts = stratified_split(labels, IMAGE_FOLDER_SPLIT_SEED, fractions)
        _warn_classes_not_held_out(self.dirs["train"], train, parts)
        todo = {k: (self.dirs["train"], [train[p] for p in v]) for k, v in parts.items() if v}
        for split in self.dirs.keys() - {"train"}:
            todo[split] = (self.dirs[split], list(enumerate(self.items[split])))
        return {k: self._generate_examples(k, root, ex) for k, (root, ex) in todo.items()}

    def _generate_examples(
        self, split: str, root: pathlib.Path, examples: list
    ) -> Iterator[tuple[int, dict]]:
        skipped, converted = [], collections.Counter()
        for image_id, (rel, label) in examples:
            try:
                data = (root / rel).read_bytes()
                pixels, mode, as_is = decode_image(data)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                skipped.append([rel, f"{type(e).__name__}: {e}"])
                continue
            if mode != "RGB":
                converted[mode] += 1
            yield (
                image_id,
                {
                    "image": data if as_is else encode_png(pixels),
                    "height": pixels.shape[0],
                    "width": pixels.shape[1],
                    "label": self.label_names.index(label),
                    "id": image_id,
                    "file": rel,
                },
            )
        self._report(split, root, len(examples), skipped, converted)

    def _report(self, split: str, root: pathlib.Path, total: int, skipped: list, converted) -> None:
        self.info.metadata["skipped"][split] = skipped
        self.info.metadata["converted"][split] = dict(sorted(converted.items()))
        if converted:
            modes = ", ".join(f"{n} {m}" for m, n in sorted(converted.items()))
            _LOG.info("%s (%s): converted to RGB: %s (of %d images)", root, split, modes, total)
        if skipped:
            shown = "; ".join(f"{f} ({why})" for f, why in skipped[:_SHOW_SKIPPED])
            more = (
                f"; and {len(skipped) - _SHOW_SKIPPED} more" if len(skipped) > _SHOW_SKIPPED else ""
            )
            _LOG.warning(
                "%s (%s): skipped %d of %d images that could not be decoded: %s%s",
                root,
                split,
                len(skipped),
                total,
                shown,
                more,
            )
        if len(skipped) == total:
            raise _file_error(
                root, f"none of the {total} images of split {split!r} could be decoded (see above)"
            )
