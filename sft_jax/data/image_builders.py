"""tensorflow-datasets builders for image classification (array_record, no TensorFlow).

Two builders write `array_record` files into a local `data_dir` without network access:

* `FashionMnist` (here): Fashion-MNIST from its IDX files (Debian: `apt-get install -y
  dataset-fashion-mnist`). Records: `{"image": uint8 [28, 28, 1], "label", "id"}`.
* `ImageFolder` (`sft_jax.data.image_folder`): a user's folders, one sub-folder per class.

`load_image_classification` picks one from a config, prepares it if needed and returns
`ImageClsData` with random access sources; `sft_jax.data.vision.image_cls_dataset` turns a
source into batches. `id` is the 0-based position of the example in its source (the IDX file,
or the sorted file list of the split's folder).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from grain.sources import RandomAccessDataSource

from sft_jax.data.builders import SubsetSource, prepare_sources, stratified_split, train_subset
from sft_jax.data.files import DataFileError
from sft_jax.data.image_folder import ImageFolder

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
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of an unsigned-byte IDX file
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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


# ---------------------------------------------------------------------------- loading


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
    sources = prepare_sources(builder, image=True)
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
