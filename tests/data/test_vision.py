"""Tests for sft_jax.data.vision: exact transforms, seeded augmentation, exact batches."""

import io
import math

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from sft_jax.data import vision, warp
from sft_jax.data.limits import ImageSpec
from sft_jax.data.text import num_batches

SPEC = ImageSpec(4, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0), "test")
AUG = vision.AugmentConfig(enabled=True, scale=(0.3, 1.0), shear_degrees=15.0, translate=0.1)


def _grey(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 1), dtype=np.uint8)


def _records(images, labels=None):
    labels = labels if labels is not None else [i % 3 for i in range(len(images))]
    return [
        {"image": im, "label": np.int64(y), "id": np.int64(i)}
        for i, (im, y) in enumerate(zip(images, labels))
    ]


# ---------------------------------------------------------------------------- transforms


def test_to_rgb():
    grey = np.array([[[1], [2]], [[3], [4]]], np.uint8)  # [2, 2, 1]
    want = np.array([[[1, 1, 1], [2, 2, 2]], [[3, 3, 3], [4, 4, 4]]], np.uint8)
    np.testing.assert_array_equal(vision.to_rgb(grey), want)
    np.testing.assert_array_equal(vision.to_rgb(grey[..., 0]), want)  # [H, W] too
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert vision.to_rgb(rgb) is rgb
    rgba = np.arange(16, dtype=np.uint8).reshape(2, 2, 4)
    np.testing.assert_array_equal(vision.to_rgb(rgba), rgba[..., :3])  # alpha dropped
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        vision.to_rgb(np.zeros((2, 2, 2)))


def test_normalize_known_values():
    image = np.array([[[0.0, 0.5, 1.0], [1.0, 0.25, 0.5]]], np.float32)  # [1, 2, 3]
    out = vision.normalize(image, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[-1.0, 1.0, 0.5], [1.0, 0.0, 0.25]]])


def test_resize_2x2_to_4x4_by_hand():
    image = np.array([[0, 4], [8, 12]], np.uint8)
    # x_in = (x_out + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25: taps (0 | 0.75, 0.25 |
    # 0.25, 0.75 | 1), the ends clamped to the edge pixel. Rows likewise.
    want = [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]
    matrix = warp.resize_matrix((2, 2), 4)
    np.testing.assert_array_equal(matrix, [[0.5, 0, -0.25], [0, 0.5, -0.25]])
    out = warp.warp(image, matrix, 4)
    assert out.shape == (4, 4, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], want)
    np.testing.assert_array_equal(warp.warp(image, matrix, 4, _force_general=True)[..., 0], want)


def test_identity_warp_is_exact():
    image = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for matrix in (warp.resize_matrix((5, 7), (5, 7)), np.eye(2, 3)):
        np.testing.assert_array_equal(warp.warp(image, matrix, (5, 7)), image)
        np.testing.assert_array_equal(warp.warp(image, matrix, (5, 7), _force_general=True), image)


def test_resize_matches_torch_and_pil():
    image = np.random.default_rng(2).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    for out_hw in ((20, 31), (4, 6), (9, 5)):  # up, down, mixed
        ours = warp.warp(image, warp.resize_matrix((9, 13), out_hw), out_hw)
        ref = torch.nn.functional.interpolate(  # antialias: PIL's filter (no-op when upsampling)
            tensor, size=out_hw, mode="bilinear", align_corners=False, antialias=True
        )
        np.testing.assert_allclose(
            ours, ref[0].permute(1, 2, 0).numpy(), atol=1e-3
        )  # torch: f32 coords
    # PIL's bilinear filter equals plain bilinear when upsampling (edges included).
    grey = image[..., 0].astype(np.float32)
    pil = Image.fromarray(grey, mode="F").resize((31, 20), Image.Resampling.BILINEAR)
    ours = warp.warp(image[..., :1], warp.resize_matrix((9, 13), (20, 31)), (20, 31))[..., 0]
    np.testing.assert_allclose(ours, np.asarray(pil), atol=1e-3)


def test_general_path_matches_axis_aligned_and_naive_bilinear():
    image = _grey(6, 5, seed=3)
    for matrix in (  # neither shrinks (a shrunk axis is anti-aliased, the general path is not)
        warp.box_matrix((-2.0, 1.5, 7.5, 3.0), (7, 8), flip=True),
        warp.resize_matrix((6, 5), (7, 8)),
    ):
        fast = warp.warp(image, matrix, (7, 8))
        np.testing.assert_array_equal(fast, warp.warp(image, matrix, (7, 8), _force_general=True))
    # A sheared map that does not shrink: plain bilinear (one that shrinks is prefiltered).
    matrix = warp.box_matrix((-2.0, 1.5, 5.0, 3.0), 6, shear_degrees=(20.0, -10.0))
    out = warp.warp(image, matrix, 6)[..., 0]

    def pixel(y, x):  # replicated edges
        return float(image[min(max(y, 0), 5), min(max(x, 0), 4), 0])

    for yo in range(6):
        for xo in range(6):
            x, y = matrix @ [xo, yo, 1.0]
            x0, y0 = math.floor(x), math.floor(y)
            fx, fy = x - x0, y - y0
            top = pixel(y0, x0) * (1 - fx) + pixel(y0, x0 + 1) * fx
            bottom = pixel(y0 + 1, x0) * (1 - fx) + pixel(y0 + 1, x0 + 1) * fx
            assert out[yo, xo] == pytest.approx(top * (1 - fy) + bottom * fy, abs=1e-4)


def test_flip_mirrors_exactly():
    image = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    matrix = warp.box_matrix((0, 0, 3, 3), 3, flip=True)
    np.testing.assert_array_equal(matrix, [[-1, 0, 2], [0, 1, 0]])
    np.testing.assert_array_equal(warp.warp(image, matrix, 3), image[:, ::-1])


def test_zoom_and_translation_matrices():
    # The 2x2 box at (1, 1) of a 4x4 image onto 4x4: output centre x -> 1 + 2 (x + 0.5) / 4 - 0.5.
    matrix = warp.box_matrix((1, 1, 2, 2), 4)
    np.testing.assert_array_equal(matrix, [[0.5, 0, 0.75], [0, 0.5, 0.75]])
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    out = warp.warp(image, matrix, 4)[..., 0]
    assert out[0, 0] == pytest.approx(image[0, 0] + 0.75 * 4 + 0.75)  # bilinear at (0.75, 0.75)
    # A box shifted by (dx, dy) shifts every sample by (dx, dy).
    shifted = warp.box_matrix((3, -2, 2, 2), 4)
    np.testing.assert_array_equal(shifted - matrix, [[0, 0, 2], [0, 0, -3]])


def test_shear_maps_known_points():
    matrix = warp.box_matrix((0, 0, 4, 4), 4, shear_degrees=(45.0, 0.0))
    centre = np.array([1.5, 1.5, 1.0])  # box centre in pixel-centre units: a fixed point
    np.testing.assert_allclose(matrix @ centre, [1.5, 1.5])
    # Two pixels below the centre moves two pixels right (tan 45 = 1); rows stay put.
    np.testing.assert_allclose(matrix @ [1.5, 3.5, 1.0], [3.5, 3.5])
    np.testing.assert_allclose(matrix @ [3.5, 1.5, 1.0], [3.5, 1.5])
    y_shear = warp.box_matrix((0, 0, 4, 4), 4, shear_degrees=(0.0, -30.0))
    np.testing.assert_allclose(y_shear @ [2.5, 1.5, 1.0], [2.5, 1.5 - math.tan(math.radians(30))])


def test_sample_crop_ranges_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, bw, bh = vision.sample_crop(rng, 30, 40, (0.2, 0.9), (0.5, 2.0))
        assert 0 <= x0 and x0 + bw <= 40 + 1e-9 and 0 <= y0 and y0 + bh <= 30 + 1e-9
        assert 0.2 - 1e-9 <= bw * bh / 1200 <= 0.9 + 1e-9 and 0.5 - 1e-9 <= bw / bh <= 2.0 + 1e-9
    # No crop of a 10x10 image has aspect >= 5 with area >= 90%: centre crop, ratio clamped.
    assert vision.sample_crop(rng, 10, 10, (0.9, 1.0), (5.0, 6.0)) == (0.0, 4.0, 10.0, 2.0)


def test_augment_config_from_config():
    cfg = ml_collections.ConfigDict(
        dict(
            enabled=True,
            scale=(0.6, 1.0),
            ratio=[0.8, 1.25],
            shear_degrees=5,
            hflip=False,
            translate=0.05,
        )
    )
    aug = vision.AugmentConfig.from_config(cfg)
    assert aug == vision.AugmentConfig(True, (0.6, 1.0), (0.8, 1.25), 5, False, 0.05)
    assert vision.AugmentConfig.from_config(None) == vision.AugmentConfig()
    with pytest.raises(ValueError, match=r"unknown data.augment keys \['rotate'\]"):
        vision.AugmentConfig.from_config({"rotate": 10})
    with pytest.raises(ValueError, match="data.augment.scale"):
        vision.AugmentConfig(scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="data.augment.shear_degrees"):
        vision.AugmentConfig(shear_degrees=50)


# ---------------------------------------------------------------------------- pipeline


def _dataset(source, **kw):
    args = dict(
        image_size=None,
        batch_size=4,
        train=False,
        augment=None,
        seed=0,
        shuffle=False,
        drop_remainder=False,
    )
    return vision.image_cls_dataset(source, SPEC, **{**args, **kw})


def test_eval_batches_exact_values_and_padding():
    images = [_grey(4, 4, seed=i) for i in range(5)]
    ds = _dataset(_records(images, [2, 0, 1, 2, 1]))
    assert len(ds) == 2 == num_batches(5, 4, False)
    first, last = ds[0], ds[1]
    for batch in (first, last):
        assert (
            batch["pixel_values"].shape == (4, 4, 4, 3)
            and batch["pixel_values"].dtype == np.float32
        )
        assert batch["labels"].dtype == np.int32 and batch["example_mask"].dtype == np.float32
    np.testing.assert_array_equal(first["labels"], [2, 0, 1, 2])
    np.testing.assert_array_equal(last["labels"], [1, 0, 0, 0])
    np.testing.assert_array_equal(last["example_mask"], [1, 0, 0, 0])
    np.testing.assert_array_equal(last["pixel_values"][1:], 0.0)
    # Identity resize: pixel_values[b, y, x, c] = (pixel / 255 - mean[c]) / std[c].
    for c in range(3):
        want = (images[2][..., 0].astype(np.float64) / 255 - SPEC.mean[c]) / SPEC.std[c]
        np.testing.assert_allclose(first["pixel_values"][2, ..., c], want, rtol=1e-6, atol=1e-5)
    assert len(_dataset(_records(images), drop_remainder=True)) == 1  # training drops it


def test_png_bytes_rgba_and_resize_in_pipeline():
    rgb = np.random.default_rng(4).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    rgba = np.concatenate([rgb, np.full((6, 8, 1), 7, np.uint8)], axis=-1)
    source = [{"image": buf.getvalue(), "label": 1}, {"image": rgba, "label": 0}]
    batch = _dataset(source, image_size=3)[0]
    np.testing.assert_array_equal(batch["pixel_values"][0], batch["pixel_values"][1])
    # Evaluation view of a 6x8 image: its centred 6x6 square (x from 1 to 7), resized to 3x3.
    pixels = warp.warp(rgb, warp.box_matrix((1, 0, 6, 6), 3), 3)
    want = vision.normalize(pixels / 255, SPEC.mean, SPEC.std)
    np.testing.assert_allclose(batch["pixel_values"][0], want, rtol=1e-6, atol=1e-5)


def test_augmentation_is_seeded_per_example_and_epoch():
    image = _grey(12, 12, seed=5)
    source = _records([image] * 8)
    kw = dict(train=True, augment=AUG, shuffle=True, drop_remainder=True, image_size=8)
    a, b = _dataset(source, seed=1, **kw), _dataset(source, seed=1, **kw)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["pixel_values"], b[i]["pixel_values"])
    views = a[0]["pixel_values"]
    assert len({v.tobytes() for v in views}) == 4  # the same image, four different views
    other = _dataset(source, seed=2, **kw)[0]["pixel_values"]
    assert not np.array_equal(views, other)
    two = _dataset(source, seed=1, num_epochs=2, **kw)
    assert len(two) == 4
    np.testing.assert_array_equal(two[0]["pixel_values"], views)
    assert not np.array_equal(two[2]["pixel_values"], views)  # epoch 2: new views
    # Augmented values stay within the pixel range (interpolation of edge-replicated pixels).
    lo = (0 - np.array(SPEC.mean)) / SPEC.std
    hi = (1 - np.array(SPEC.mean)) / SPEC.std
    assert np.all(views >= lo - 1e-5) and np.all(views <= hi + 1e-5)


def test_eval_batches_are_never_augmented():
    source = _records([_grey(12, 12, seed=i) for i in range(4)])
    plain = _dataset(source, image_size=8)[0]["pixel_values"]
    for kw in (
        dict(train=False, augment=AUG),
        dict(train=True, augment=vision.AugmentConfig(enabled=False)),
    ):
        np.testing.assert_array_equal(
            _dataset(source, image_size=8, **kw)[0]["pixel_values"], plain
        )
    augmented = _dataset(source, image_size=8, train=True, augment=AUG)[0]["pixel_values"]
    assert not np.array_equal(augmented, plain)


def test_flip_only_augmentation_mirrors_whole_images():
    image = _grey(5, 5, seed=6)
    aug = vision.AugmentConfig(enabled=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    batch = _dataset(_records([image] * 16), batch_size=16, train=True, augment=aug, image_size=5)[
        0
    ]
    plain = _dataset(_records([image]), batch_size=1, image_size=5)[0]["pixel_values"][0]
    flipped = [np.array_equal(v, plain[:, ::-1]) for v in batch["pixel_values"]]
    same = [np.array_equal(v, plain) for v in batch["pixel_values"]]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < 16


def test_bad_image_shape_names_record():
    with pytest.raises(ValueError, match=r"record id 0: image of shape \(4, 4, 2\)"):
        _dataset([{"image": np.zeros((4, 4, 2), np.uint8), "label": 0, "id": 0}])[0]
