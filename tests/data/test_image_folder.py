"""Image folders: classes too small for a held-out split (named in a warning, and the config
keys that give a split named right), and linked sub-folders (followed, each folder listed once).

Everything is generated under tmp_path: tiny grey PNG folders."""

import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sft_jax import components
from sft_jax.data import image_builders as ib
from sft_jax.data import image_folder as imf


def _cfg(train_dir, **kw) -> ml_collections.ConfigDict:
    base = dict(
        name="image_folder",
        fashion_mnist_dir="",
        train_dir=str(train_dir),
        validation_dir="",
        test_dir="",
        max_train_examples=0,
    )
    return ml_collections.ConfigDict({**base, **kw})


def _all(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def _grey_folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((3, 3), 20 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def _warnings(caplog) -> list[str]:
    """This project's warnings (not tfds' own, logged through absl)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("sft_jax")
    ]


def test_image_folder_small_classes_are_named_when_held_out(tmp_path, caplog):
    # round(5 * 0.1) = 0: "cat" gives the held-out splits nothing; round(12 * 0.1) = 1.
    train = _grey_folder(tmp_path / "train", {"cat": 5, "dog": 12})
    cfg = _cfg(train)
    with caplog.at_level(logging.WARNING):
        data = ib.load_image_classification(cfg, tmp_path / "tfds")
    assert {k: len(v) for k, v in data.sources.items()} == {"train": 15, "validation": 1, "test": 1}
    for split in ("validation", "test"):
        assert [r["file"][:4] for r in _all(data.sources[split])] == [b"dog/"]
    assert _warnings(caplog) == [
        f"{train}: 1 of 2 classes have too few images to hold out 10% of each for the "
        "validation / test split, so they have no image there: cat (5 images); pass "
        "data.validation_dir / data.test_dir to evaluate on images of your own"
    ]


def test_image_folder_too_small_for_a_validation_split_names_the_dir_keys(tmp_path, caplog):
    train = _grey_folder(tmp_path / "train", {"cat": 5, "dog": 5})
    _grey_folder(tmp_path / "test", {"cat": 1, "dog": 1})
    cfg = _cfg(train, test_dir=str(tmp_path / "test"))
    with caplog.at_level(logging.WARNING):
        data = ib.load_image_classification(cfg, tmp_path / "tfds")
    assert {k: len(v) for k, v in data.sources.items()} == {"train": 10, "test": 2}
    assert _warnings(caplog) == [
        f"{train}: 2 of 2 classes have too few images to hold out 10% of each for the "
        "validation split, so they have no image there: cat (5 images), dog (5 images); pass "
        "data.validation_dir to evaluate on images of your own",
        f"Dataset {data.dataset} has no validation split (splits: ['test', 'train']); pass "
        "data.validation_dir to evaluate during training.",
    ]
    with pytest.raises(
        ValueError,
        match=r"^split 'validation' is not in the dataset \(has \['test', 'train'\]\); for "
        r"your own image folders set data.validation_dir / data.test_dir$",
    ):
        components._check_split(data, "validation", image=True)
    with pytest.raises(ValueError, match=r"for your own files set data.validation_file / "):
        components._check_split(data, "validation")


def test_image_folder_all_classes_held_out_warns_nothing(tmp_path, caplog):
    train = _grey_folder(tmp_path / "train", {"cat": 6, "dog": 7})  # round(0.6) = round(0.7) = 1
    with caplog.at_level(logging.WARNING):
        data = ib.load_image_classification(_cfg(train), tmp_path / "tfds")
    assert {k: len(v) for k, v in data.sources.items()} == {"train": 9, "validation": 2, "test": 2}
    assert _warnings(caplog) == []


def test_image_folder_follows_linked_sub_folders_once(tmp_path, caplog):
    store = _grey_folder(tmp_path / "store", {"batch1": 2})
    train = _grey_folder(tmp_path / "train", {"cat": 1, "dog": 1})
    os.symlink(store / "batch1", train / "cat" / "batch1")  # images kept elsewhere
    os.symlink(store / "batch1", train / "cat" / "again")  # the same folder a second time
    os.symlink(train / "cat", train / "cat" / "batch1_loop")  # a loop back to the class
    with caplog.at_level(logging.WARNING, logger=imf.__name__):
        listing = imf.scan_image_folder(train)
    assert listing == [
        ("cat/0.png", "cat"),
        ("cat/again/0.png", "cat"),
        ("cat/again/1.png", "cat"),
        ("dog/0.png", "dog"),
    ]
    real = os.path.realpath(store / "batch1")
    assert _warnings(caplog) == [
        f"{train / 'cat' / 'batch1'}: skipped, the same folder as {real} was already listed",
        f"{train / 'cat' / 'batch1_loop'}: skipped, the same folder as "
        f"{os.path.realpath(train / 'cat')} was already listed",
    ]


def test_decode_image_ignores_malformed_exif(tmp_path):
    """A PNG whose eXIf chunk is not TIFF data (written by some tools, e.g. the repr of the
    bytes, b"b'Exif\\x00..."; Pillow's `getexif` raises SyntaxError on it) is decoded as
    stored, not skipped as undecodable: its pixels are fine, and no orientation is known."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    path = tmp_path / "bad_exif.png"
    Image.fromarray(pixels).save(path, exif=b"b'Exif\\x00\\x00MM\\x00*'")
    with Image.open(path) as im, pytest.raises(SyntaxError):
        im.getexif()
    decoded, mode, as_is = imf.decode_image(path.read_bytes())
    np.testing.assert_array_equal(decoded, pixels)
    assert mode == "RGB" and as_is
