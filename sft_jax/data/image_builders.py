"""tensorflow-datasets builders for image classification (array_record, no TensorFlow).

Two builders write `array_record` files into a local `data_dir` without network access:

* `FashionMnist`: Fashion-MNIST from its IDX files (Debian: `apt-get install -y
  dataset-fashion-mnist`). Records: `{"image": uint8 [28, 28, 1], "label", "id"}`.
* `ImageFolder`: a user's folders, one sub-folder per class. Every image is decoded with Pillow
  when the dataset is prepared (unreadable files are skipped and counted). A JPEG or PNG that
  decodes straight to RGB or grey (no EXIF rotation, one frame) is stored as the file's own
  bytes: the pipeline's Pillow (the same pinned version) decodes exactly the pixels checked
  here, and JPEG decodes ~5x faster than PNG. Anything else (palette, alpha, CMYK, 16-bit,
  EXIF-rotated, BMP / GIF / WebP) is converted to RGB and stored as lossless PNG. Nothing is
  resized. Records:
  `{"image": encoded bytes, "height", "width", "label", "id", "file"}`.

`load_image_classification` picks one from a config, prepares it if needed and returns
`ImageClsData` with random access sources; `sft_jax.data.vision.image_cls_dataset` turns a
source into batches. `id` is the 0-based position of the example in its source (the IDX file,
or the sorted file list of the split's folder).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.sources import RandomAccessDataSource
from PIL import ExifTags, Image, ImageOps

from sft_jax.data.builders import prepare_sources, stratified_split, train_subset
from sft_jax.data.files import DataFileError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Fixed forever: changing either changes which images land in train / validation.
FASHION_MNIST_SPLIT_SEED = 20240715
FASHION_MNIST_VALIDATION = 1 / 12  # of each class of the train file: 500 x 10 = 5,000 images
IMAGE_FOLDER_SPLIT_SEED = 20240716
IMAGE_FOLDER_HELD_OUT = 0.1  # of each class, for a validation / test split without a folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of an unsigned-byte IDX file
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SHOW_SKIPPED = 5  # skipped files named in the log line
_LOG = logging.getLogger(__name__)


def _file_error(path: Any, problem: str) -> DataFileError:
    return DataFileError(path, None, None, problem)


# ---------------------------------------------------------------------------- IDX files


def _idx_path(directory: pathlib.Path, stem: str) -> pathlib.Path:
    """`stem.gz`, else the uncompressed `stem`; FileNotFoundError naming both and the fix."""
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{directory / stem}.gz not found (nor uncompressed); Fashion-MNIST needs its four IDX "
        f"files: {FASHION_MNIST_HINT}, or set data.fashion_mnist_dir"
    )


def _idx_bytes(path: pathlib.Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut .gz is an EOFError
        raise _file_error(path, f"cannot read the file ({e})") from None


def read_idx(path: str | pathlib.Path, ndim: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file (`.gz` or plain) into a uint8 array.

    Args:
      path: the file.
      ndim: expected dimensions: 3 for images (magic 2051), 1 for labels (magic 2049).

    Returns:
      uint8 array of the header's shape, e.g. [N, 28, 28] or [N].

    Raises:
      DataFileError: naming the file, for a bad magic number or a byte count that does not
        match the header's dimensions.
    """
    path = pathlib.Path(path)
    data = _idx_bytes(path)
    head = 4 + 4 * ndim
    if len(data) < head:
        raise _file_error(path, f"only {len(data)} bytes, shorter than an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataFileError(
            path, None, None, f"magic number {magic}, expected {_IDX_MAGIC[ndim]} (ndim={ndim})"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    want = int(np.prod(dims))
    if len(data) - head != want:
        raise DataFileError(
            path, None, None, f"{len(data) - head} data bytes, header dims {dims} need {want}"
        )
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


def read_fashion_mnist(directory: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads and checks the four Fashion-MNIST IDX files.

    Returns:
      {"train": (images uint8 [60000, 28, 28, 1], labels uint8 [60000]),
       "test": (images [10000, 28, 28, 1], labels [10000])} (sizes as in the files).

    Raises:
      FileNotFoundError: a file is missing (names it and the apt-get command).
      DataFileError: naming the file: bad header, byte count, labels outside 0..9, image and
        label counts that differ, test images of another size than the train images.
    """
    directory = pathlib.Path(directory)
    out = {}
    for split, (image_stem, label_stem) in _FILES.items():
        image_path, label_path = _idx_path(directory, image_stem), _idx_path(directory, label_stem)
        images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
        if len(images) != len(labels):
            raise _file_error(
                image_path,
                f"{len(images)} images but {label_path} has {len(labels)} labels",
            )
        bad = np.flatnonzero(labels >= len(FASHION_MNIST_LABELS))
        if bad.size:
            raise _file_error(
                label_path,
                f"label {labels[bad[0]]} at position {bad[0]} is not in "
                f"0..{len(FASHION_MNIST_LABELS) - 1}",
            )
        if split == "test" and images.shape[1:] != out["train"][0].shape[1:3]:
            raise _file_error(
                image_path,
                f"images are {images.shape[1:]}, train images are {out['train'][0].shape[1:3]}",
            )
        out[split] = (images[..., None], labels)
    return out


def _idx_shape(path: pathlib.Path) -> tuple[int, int]:
    """(rows, cols) from an image IDX header, reading only its first 16 bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(16)
    except (OSError, EOFError) as e:
        raise _file_error(path, f"cannot read the file ({e})") from None
    if len(head) < 16 or int.from_bytes(head[:4], "big") != _IDX_MAGIC[3]:
        raise _file_error(path, f"not an IDX image file (magic {head[:4].hex()})")
    return int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")


class FashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Zalando, MIT): 28x28 grey clothing images in 10 classes.

    Splits: `train` (55,000) and `validation` (5,000: 1/12 of each class, by the fixed seeded
    `stratified_split` of the 60,000-image train file), `test` (the 10,000 t10k images).
    Within a split, examples keep the file order; `id` is the position in the IDX file.
    The config name is a hash of the files' bytes, so other files prepare separately.
    """

    name = "fashion_mnist_idx"  # "fashion_mnist" is tfds' own catalog builder
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download, so no checksums file to look up beside the code

    def __init__(
        self,
        *,
        directory: str | pathlib.Path | None = None,
        data_dir: str | pathlib.Path | None = None,
    ):
        """Checks the files exist and hashes them; `directory` defaults to Debian's."""
        self.directory = pathlib.Path(directory or FASHION_MNIST_DIR)
        paths = [_idx_path(self.directory, s) for stems in _FILES.values() for s in stems]
        digest = hashlib.sha256()
        for path in paths:
            digest.update(f"{path.name}:".encode() + path.read_bytes())
        self.image_shape = (*_idx_shape(paths[0]), 1)
        config = tfds.core.BuilderConfig(
            name=f"sha256_{digest.hexdigest()[:16]}", description=f"IDX files in {self.directory}"
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # Pickling re-runs __init__ with these (DatasetBuilder.__setstate__).
        self._original_state = dict(directory=directory, data_dir=data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        # A raw uint8 Tensor: tfds' Image feature needs TensorFlow to encode PNG.
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=self.image_shape, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(FASHION_MNIST_LABELS)),
                "id": np.int64,
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST: Zalando article images, 10 classes.",
            features=features,
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # everything is local
        data = read_fashion_mnist(self.directory)
        images, labels = data["train"]
        fractions = {"train": 1 - FASHION_MNIST_VALIDATION, "validation": FASHION_MNIST_VALIDATION}
        splits = stratified_split(labels.tolist(), FASHION_MNIST_SPLIT_SEED, fractions)
        gens = {k: self._generate_examples(images, labels, v) for k, v in splits.items()}
        test_images, test_labels = data["test"]
        gens["test"] = self._generate_examples(test_images, test_labels, range(len(test_labels)))
        return gens

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, positions):
        for pos in positions:
            yield int(pos), {"image": images[pos], "label": int(labels[pos]), "id": int(pos)}


# ---------------------------------------------------------------------------- image folders


def _is_hidden(rel: pathlib.PurePath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _class_files(class_dir: pathlib.Path) -> tuple[list[str], int]:
    """(sorted image paths relative to `class_dir`, number of non-image files ignored)."""
    images, other = [], 0
    for root, dirs, names in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
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
      root: the folder; each sub-folder is a class, holding images at any depth.
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

    EXIF orientation is applied (the image as viewers show it); animated GIF / WebP / PNG give
    their first frame. Other modes are converted with Pillow's `convert("RGB")`: grey is
    repeated, palettes are looked up, alpha is dropped (as torchvision's loader does), CMYK is
    converted. 16-bit grey is scaled to 8 bits (v / 257, rounded) rather than clipped.

    Returns:
      (pixels, the file's original mode (e.g. "L", "P", "RGBA"), whether `data` itself is a
      JPEG or PNG that decodes to these pixels with no conversion but grey -> RGB).

    Raises:
      OSError / ValueError / SyntaxError (Pillow's): truncated or unreadable data.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated data
        mode = im.mode
        rotated = im.getexif().get(ExifTags.Base.Orientation, 1) != 1
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
    """Hash of every listed file's path, size and modification time (not its bytes)."""
    digest = hashlib.sha256()
    for split, root in dirs.items():
        digest.update(f"{split}:{root.resolve()}\n".encode())
        for rel, _ in items[split]:
            st = (root / rel).stat()
            digest.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
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


class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """A user's image folders (`root/<class>/**/<image>`), one sub-folder per class.

    The folders are listed and checked when the builder is constructed; images are decoded
    when it prepares. Label names are the sorted class folder names. A split without a folder
    (`validation_dir` / `test_dir` not given) is split off train: `IMAGE_FOLDER_HELD_OUT` of
    each class by the fixed seeded `stratified_split` (by listing position, decided before
    decoding). How images are stored: see the module docstring (exact pixels, original size).
    Files Pillow cannot decode (truncated, not an image) are skipped: one warning
    per split names the first few and the count, and `info.metadata["skipped"]` keeps the
    list. The config name hashes every file's path, size and modification time, so changed
    folders prepare into a fresh directory.
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


# ---------------------------------------------------------------------------- loading


class SubsetSource(Sequence):
    """A read-only view of `source` at the given positions that keeps batched reads
    (`__getitems__`, one parallel array_record read per batch)."""

    def __init__(self, source: RandomAccessDataSource, positions: Sequence[int]):
        self._source, self._positions = source, list(positions)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> Any:
        return self._source[self._positions[index]]

    def __getitems__(self, indices: Sequence[int]) -> list:
        picked = [self._positions[i] for i in indices]
        getitems = getattr(self._source, "__getitems__", None)
        return list(getitems(picked)) if getitems else [self._source[p] for p in picked]

    def __repr__(self) -> str:
        return f"SubsetSource({self._source!r}, n={len(self)})"


@dataclasses.dataclass
class ImageClsData:
    """Prepared image classification data.

    Attributes:
      sources: split name ("train", "validation", "test") -> random access source of records
        (see the module docstring): `image` is uint8 [H, W, C] (C = 1 or 3) or encoded bytes.
      label_names: class names; record label `i` means `label_names[i]`.
      dataset: the tfds builder's full name (name/config/version), for logs.
      skipped: split -> files skipped as undecodable (`ImageFolder`; empty otherwise).
    """

    sources: dict[str, RandomAccessDataSource]
    label_names: list[str]
    dataset: str
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def image_builder_from_config(
    data_cfg: ml_collections.ConfigDict, data_dir: str | pathlib.Path
) -> tfds.core.GeneratorBasedBuilder:
    """The builder `data_cfg.name` selects: "fashion_mnist" or "image_folder"."""
    if data_cfg.name == "fashion_mnist":
        return FashionMnist(directory=data_cfg.get("fashion_mnist_dir") or None, data_dir=data_dir)
    if data_cfg.name == "image_folder":
        if not data_cfg.get("train_dir"):
            raise ValueError(
                "data.name='image_folder' needs data.train_dir (one sub-folder per class)"
            )
        return ImageFolder(
            train_dir=data_cfg.train_dir,
            validation_dir=data_cfg.get("validation_dir") or None,
            test_dir=data_cfg.get("test_dir") or None,
            data_dir=data_dir,
        )
    raise ValueError(
        f"Unknown data.name {data_cfg.name!r}; expected 'fashion_mnist' or 'image_folder'"
    )


def load_image_classification(
    data_cfg: ml_collections.ConfigDict, data_dir: str | pathlib.Path
) -> ImageClsData:
    """Prepares (once) and opens an image classification dataset.

    Args:
      data_cfg: fields `name` ("fashion_mnist" or "image_folder"), `fashion_mnist_dir`,
        `train_dir`, `validation_dir`, `test_dir` (empty strings when unused) and
        `max_train_examples` (0 / None = all; otherwise the first N of a fixed seeded
        permutation of the train split, kept in split order).
      data_dir: tfds data directory; prepared data is reused from here.

    Returns:
      The splits, label names, dataset name and the files skipped while preparing.
    """
    builder = image_builder_from_config(data_cfg, data_dir)
    sources = prepare_sources(builder)
    keep = train_subset(len(sources["train"]), data_cfg.get("max_train_examples", 0))
    if keep is not None:
        sources["train"] = SubsetSource(sources["train"], keep)
    skipped = dict(builder.info.metadata.get("skipped", {})) if builder.info.metadata else {}
    return ImageClsData(
        sources,
        list(builder.info.features["label"].names),
        builder.info.full_name,
        {k: [f for f, _ in v] for k, v in skipped.items() if v},
    )
