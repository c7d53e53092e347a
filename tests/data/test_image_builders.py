"""Tests for sft_jax.data.image_builders: IDX files (Fashion-MNIST) and user image folders.

Everything is generated under tmp_path: tiny IDX .gz files, tiny PNG / JPEG folders."""

import collections
import gzip
import io
import logging
import os
import pickle
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sft_jax.data import builders, vision
from sft_jax.data import image_builders as ib
from sft_jax.data import image_folder as imf
from sft_jax.data.files import DataFileError
from sft_jax.data.limits import ImageSpec


def _cfg(**kw) -> ml_collections.ConfigDict:
    base = dict(
        name="fashion_mnist",
        fashion_mnist_dir="",
        train_dir="",
        validation_dir="",
        test_dir="",
        max_train_examples=0,
    )
    return ml_collections.ConfigDict({**base, **kw})


def _idx(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else {3: 2051, 1: 2049}[array.ndim]
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _write_mnist(directory, n_train=240, n_test=30, shape=(6, 5), seed=0):
    """Tiny IDX files: labels cycle through 0..9, images random. Returns the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        labels = (np.arange(n) * 7 % 10).astype(np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
        data[prefix] = (images, labels)
    return data


def _all(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------- IDX / Fashion-MNIST


def test_read_idx_round_trips(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 2), dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "b").write_bytes(_idx(images[:, 0, 0]))
    np.testing.assert_array_equal(ib.read_idx(tmp_path / "a.gz", 3), images)
    np.testing.assert_array_equal(ib.read_idx(tmp_path / "b", 1), images[:, 0, 0])


_Z = np.zeros((2, 3, 3), np.uint8)


@pytest.mark.parametrize(
    "content, match",
    [
        (gzip.compress(_idx(_Z, magic=2049)), r"magic number 2049, expected 2051"),
        (gzip.compress(_idx(_Z))[:-9], r"cannot read the file"),  # a cut .gz
        (gzip.compress(_idx(_Z)[:-1]), r"17 data bytes, header dims \[2, 3, 3\] need 18"),
        (gzip.compress(_idx(_Z)[:10]), r"only 10 bytes, shorter than an IDX header"),
        (b"not gzip at all", r"cannot read the file"),
    ],
    ids=["magic", "cut-gz", "short-payload", "short-header", "not-gzip"],
)
def test_read_idx_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=rf"train-images-idx3-ubyte\.gz: {match}"):
        ib.read_idx(path, 3)


def test_read_fashion_mnist_checks_across_files(tmp_path):
    data = _write_mnist(tmp_path, n_train=20, n_test=10)
    out = ib.read_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(out["train"][0][..., 0], data["train"][0])
    np.testing.assert_array_equal(out["test"][1], data["t10k"][1])
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx(np.zeros(9))))
    with pytest.raises(
        DataFileError, match=r"t10k-images-idx3-ubyte\.gz: 10 images but .*t10k-labels"
    ):
        ib.read_fashion_mnist(tmp_path)
    labels.write_bytes(gzip.compress(_idx(np.array([0] * 9 + [10]))))
    with pytest.raises(DataFileError, match=r"t10k-labels-idx1-ubyte\.gz: label 10 at position 9"):
        ib.read_fashion_mnist(tmp_path)
    labels.unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"t10k-labels-idx1-ubyte\.gz not found.*apt-get install -y dataset-fashion-mnist",
    ):
        ib.read_fashion_mnist(tmp_path)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    arrays = _write_mnist(root / "files")
    data = ib.load_image_classification(_cfg(fashion_mnist_dir=str(root / "files")), root / "tfds")
    return root, arrays, data


def test_fashion_mnist_splits_exact_and_stratified(mnist):
    _, arrays, data = mnist
    assert data.label_names == list(ib.FASHION_MNIST_LABELS) and data.skipped == {}
    assert data.dataset.startswith("fashion_mnist_idx/sha256_")
    assert {k: len(v) for k, v in data.sources.items()} == {
        "train": 220,
        "validation": 20,
        "test": 30,
    }
    records = {k: _all(v) for k, v in data.sources.items()}
    images, labels = arrays["train"]
    ids = {}
    for split in ("train", "validation"):
        ids[split] = [int(r["id"]) for r in records[split]]
        assert ids[split] == sorted(ids[split])  # file order within a split
        for r in records[split]:
            assert r["image"].shape == (6, 5, 1) and r["image"].dtype == np.uint8
            np.testing.assert_array_equal(r["image"][..., 0], images[r["id"]])
            assert r["label"] == labels[r["id"]]
    assert not set(ids["train"]) & set(ids["validation"])
    assert sorted(ids["train"] + ids["validation"]) == list(range(240))
    # 24 per class: 24 / 12 = 2 of each class in validation.
    assert collections.Counter(int(r["label"]) for r in records["validation"]) == {
        c: 2 for c in range(10)
    }
    test_images, test_labels = arrays["t10k"]
    assert [int(r["id"]) for r in records["test"]] == list(range(30))
    np.testing.assert_array_equal(
        np.stack([r["image"][..., 0] for r in records["test"]]), test_images
    )
    np.testing.assert_array_equal([r["label"] for r in records["test"]], test_labels)


def test_fashion_mnist_subsample_and_reuse(mnist):
    root, _, full = mnist
    small = ib.load_image_classification(
        _cfg(fashion_mnist_dir=str(root / "files"), max_train_examples=50), root / "tfds"
    )
    assert len(small.sources["train"]) == 50 and len(small.sources["test"]) == 30
    assert small.dataset == full.dataset  # prepared once, reused
    got = small.sources["train"].__getitems__([0, 49])
    assert [int(r["id"]) for r in got] == [int(small.sources["train"][i]["id"]) for i in (0, 49)]


def test_fashion_mnist_pipeline_identity_pixels(mnist):
    _, arrays, data = mnist
    spec = ImageSpec(5, (0.2, 0.4, 0.6), (0.3, 0.2, 0.1), "test")
    ds = vision.image_cls_dataset(
        data.sources["test"], spec, image_size=None, batch_size=8, train=False,
        augment=None, seed=0, shuffle=False, drop_remainder=False,
    )  # fmt: skip
    assert len(ds) == 4
    last = ds[3]
    np.testing.assert_array_equal(last["example_mask"], [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(last["labels"][:6], arrays["t10k"][1][24:])
    # A 6x5 image's evaluation view is its centred 5x5 square, rows 0.5 to 5.5: with S = 5
    # output row y samples input row y + 0.5, the mean of rows y and y + 1; columns as they are.
    image = arrays["t10k"][0][25].astype(np.float64)
    want = (image[:-1] + image[1:]) / 2  # [5, 5]
    for c in range(3):
        expect = (want / 255 - spec.mean[c]) / spec.std[c]
        np.testing.assert_allclose(last["pixel_values"][1, ..., c], expect, rtol=1e-5, atol=1e-5)


def test_missing_default_directory_names_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(ib, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(
        FileNotFoundError,
        match=r"nowhere/train-images-idx3-ubyte\.gz not found.*"
        r"apt-get install -y dataset-fashion-mnist",
    ):
        ib.load_image_classification(_cfg(), tmp_path / "tfds")


def test_bad_idx_fails_before_a_dataset_exists(tmp_path):
    _write_mnist(tmp_path / "files", n_train=20, n_test=10)
    (tmp_path / "files" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx(np.zeros(3, np.uint8), magic=2051))
    )
    with pytest.raises(
        DataFileError, match=r"train-labels-idx1-ubyte\.gz: magic number 2051, expected 2049"
    ):
        ib.load_image_classification(
            _cfg(fashion_mnist_dir=str(tmp_path / "files")), tmp_path / "tfds"
        )
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_builder_pickles(mnist):
    root, _, _ = mnist
    builder = ib.FashionMnist(directory=root / "files", data_dir=root / "tfds")
    clone = pickle.loads(pickle.dumps(builder))
    assert clone.data_dir == builder.data_dir and clone.image_shape == (6, 5, 1)


# ---------------------------------------------------------------------------- image folders


def _save(path, array, mode=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def _make_folders(root, rng):
    """train/{ant,bee,cat}: 7 images each of mixed modes and formats, plus three bad files (a
    truncated JPEG, text named .png, a broken link named .png)."""
    files = {}
    for c, name in enumerate(("ant", "bee", "cat")):
        for i in range(7):
            pixels = rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)
            mode, ext = [
                ("RGB", "png"),
                ("L", "png"),
                ("RGBA", "PNG"),
                ("P", "gif"),
                ("RGB", "bmp"),
                ("L", "webp"),
                ("L", "jpeg"),
            ][(i + c) % 7]
            path = _save(
                root / "train" / name / f"{i}.{ext}",
                pixels,
                mode,
                "WEBP" if ext == "webp" else None,
            )
            files[f"{name}/{i}.{ext}"] = path
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "train" / "bee" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "train" / "cat" / "notes.png").write_text("not an image")
    (root / "train" / "cat" / "README.txt").write_text("ignored: not an image extension")
    os.symlink(root / "moved_away.png", root / "train" / "ant" / "gone.png")  # broken link
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    return files


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    files = _make_folders(root, np.random.default_rng(0))
    return root, files


def test_image_folder_modes_skips_and_exact_pixels(folders, caplog):
    root, files = folders
    caplog.set_level(logging.INFO, logger=imf.__name__)
    cfg = _cfg(name="image_folder", train_dir=str(root / "train"))
    data = ib.load_image_classification(cfg, root / "tfds")
    assert data.label_names == ["ant", "bee", "cat"]
    assert sorted(data.sources) == ["test", "train", "validation"]
    records = [r for src in data.sources.values() for r in _all(src)]
    assert len(records) == 21  # 24 image files, 3 skipped
    assert sorted(f for v in data.skipped.values() for f in v) == [
        "ant/gone.png",
        "bee/cut.jpg",
        "cat/notes.png",
    ]
    metadata = imf.ImageFolder(train_dir=root / "train", data_dir=root / "tfds").info.metadata
    why = {f: reason for v in metadata["skipped"].values() for f, reason in v}
    assert why["ant/gone.png"].startswith("FileNotFoundError")
    logged = re.findall(r"skipped (\d+) of \d+ images that could not be decoded", caplog.text)
    assert sum(map(int, logged)) == 3 and "cut.jpg" in caplog.text and "notes.png" in caplog.text
    assert "converted to RGB" in caplog.text
    as_is = 0
    for r in records:
        rel = r["file"].decode()
        stored = vision.to_rgb(vision.decode(r["image"]))  # what the pipeline sees
        assert stored.shape == (r["height"], r["width"], 3) and stored.dtype == np.uint8
        with Image.open(files[rel]) as im:
            np.testing.assert_array_equal(stored, np.asarray(im.convert("RGB")))
            if im.format in ("JPEG", "PNG") and im.mode in ("RGB", "L"):  # kept byte for byte
                assert r["image"] == files[rel].read_bytes()
                as_is += 1
        assert data.label_names[r["label"]] == rel.split("/")[0]
    assert as_is == 9  # per class: the RGB and L PNGs and the grey JPEG
    converted = imf.ImageFolder(train_dir=root / "train", data_dir=root / "tfds").info.metadata[
        "converted"
    ]
    modes = collections.Counter()
    for split_modes in converted.values():
        modes.update(split_modes)
    want = collections.Counter()
    for path in files.values():
        with Image.open(path) as im:
            want.update([im.mode] if im.mode != "RGB" else [])
    assert modes == want and {"L", "RGBA", "P"} <= set(modes)
    # Reloading reuses the prepared files and the skip list.
    again = ib.load_image_classification(cfg, root / "tfds")
    assert again.dataset == data.dataset and again.skipped == data.skipped


def test_image_folder_held_out_splits_stratified(folders):
    root, _ = folders
    cfg = _cfg(name="image_folder", train_dir=str(root / "train"))
    data = ib.load_image_classification(cfg, root / "tfds")
    listing = imf.scan_image_folder(root / "train")  # 8 ant, 8 bee, 9 cat files
    names = ["ant", "bee", "cat"]
    parts = builders.stratified_split(
        [names.index(c) for _, c in listing],
        imf.IMAGE_FOLDER_SPLIT_SEED,
        {"train": 1.0, "validation": 0.1, "test": 0.1},
    )
    for split in ("validation", "test"):  # round(0.7) = round(0.8) = round(0.9) = 1 per class
        assert sorted(listing[p][1] for p in parts[split]) == names
    skipped = {f for v in data.skipped.values() for f in v}
    for split, src in data.sources.items():
        got = [(int(r["id"]), r["file"].decode()) for r in _all(src)]
        want = [(p, listing[p][0]) for p in parts[split] if listing[p][0] not in skipped]
        assert got == want


def test_image_folder_explicit_dirs_and_pipeline(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    for split in ("train", "val", "test"):
        for name in ("no", "yes"):
            _save(tmp_path / split / name / "a.png", grey)
            _save(
                tmp_path / split / name / "sub" / "b.JPG",
                rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
            )
    cfg = _cfg(
        name="image_folder", train_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "val"), test_dir=str(tmp_path / "test"),
    )  # fmt: skip
    data = ib.load_image_classification(cfg, tmp_path / "tfds")
    assert {k: len(v) for k, v in data.sources.items()} == {"train": 4, "validation": 4, "test": 4}
    assert [r["file"] for r in _all(data.sources["test"])] == [
        b"no/a.png",
        b"no/sub/b.JPG",
        b"yes/a.png",
        b"yes/sub/b.JPG",
    ]
    assert [int(r["id"]) for r in _all(data.sources["test"])] == [0, 1, 2, 3]
    spec = ImageSpec(4, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), "test")
    ds = vision.image_cls_dataset(
        data.sources["validation"], spec, image_size=4, batch_size=3, train=False,
        augment=None, seed=0, shuffle=False, drop_remainder=False,
    )  # fmt: skip
    batch = ds[0]
    assert batch["pixel_values"].shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(batch["labels"], [0, 0, 1])
    for c in range(3):  # grey PNG, stored as RGB, identity resize
        want = (grey / 255 - spec.mean[c]) / spec.std[c]
        np.testing.assert_allclose(batch["pixel_values"][0, ..., c], want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(ds[1]["example_mask"], [1, 0, 0])


def test_image_folder_structure_errors(tmp_path):
    pixels = np.zeros((3, 3, 3), np.uint8)
    _save(tmp_path / "train" / "a" / "1.png", pixels)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "x.txt").write_text("no images here")
    with pytest.raises(DataFileError, match=r"train/b: class folder holds no images"):
        imf.ImageFolder(train_dir=tmp_path / "train", data_dir=tmp_path / "tfds")
    _save(tmp_path / "train" / "b" / "2.png", pixels)
    _save(tmp_path / "val" / "a" / "1.png", pixels)
    _save(tmp_path / "val" / "c" / "1.png", pixels)
    with pytest.raises(
        DataFileError,
        match=r"val: validation_dir has other class folders than train_dir .*train: "
        r"not in train_dir: \['c'\]; missing here: \['b'\]",
    ):
        imf.ImageFolder(train_dir=tmp_path / "train", validation_dir=tmp_path / "val")
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "1.png", pixels)
    with pytest.raises(
        DataFileError, match=r"flat: no class folders: train_dir must hold one sub-folder per class"
    ):
        imf.ImageFolder(train_dir=tmp_path / "flat")
    with pytest.raises(DataFileError, match=r"nowhere: test_dir is not a directory"):
        imf.ImageFolder(train_dir=tmp_path / "train", test_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"needs data.train_dir"):
        ib.load_image_classification(_cfg(name="image_folder"), tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"Unknown data.name 'cifar10'"):
        ib.load_image_classification(_cfg(name="cifar10"), tmp_path / "tfds")


def test_image_folder_config_name_follows_files(tmp_path):
    pixels = np.zeros((3, 3, 3), np.uint8)
    for name in ("a", "b"):
        _save(tmp_path / "train" / name / "1.png", pixels)
    first = imf.ImageFolder(train_dir=tmp_path / "train", data_dir=tmp_path / "tfds")
    assert (
        imf.ImageFolder(train_dir=tmp_path / "train", data_dir=tmp_path / "tfds").data_dir
        == first.data_dir
    )
    _save(tmp_path / "train" / "b" / "2.png", pixels)
    assert (
        imf.ImageFolder(train_dir=tmp_path / "train", data_dir=tmp_path / "tfds").data_dir
        != first.data_dir
    )
    clone = pickle.loads(pickle.dumps(first))
    assert clone.label_names == ["a", "b"]


def test_decode_image_16_bit_grey_is_scaled(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 65535, 32896]], np.uint16)).save(path)
    pixels, mode, as_is = imf.decode_image(path.read_bytes())
    assert mode.startswith("I;16") and not as_is
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 255, 128])


def test_decode_image_exif_rotation_and_as_is(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    rotated, plain = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(rotated, "JPEG", exif=exif.tobytes())
    Image.fromarray(pixels).save(plain, "JPEG")
    out, mode, as_is = imf.decode_image(rotated.getvalue())
    with Image.open(rotated) as im:
        decoded = np.asarray(im)
    assert mode == "RGB" and not as_is and out.shape == (3, 2, 3)
    np.testing.assert_array_equal(out, np.rot90(decoded, k=-1))  # 90 degrees clockwise
    out, mode, as_is = imf.decode_image(plain.getvalue())
    with Image.open(plain) as im:
        np.testing.assert_array_equal(out, np.asarray(im))
    assert as_is
