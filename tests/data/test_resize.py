"""Resizing parity: `warp.warp` against Pillow's BILINEAR filter (anti-aliased when
shrinking), and the exported `preprocessor_config.json` against our evaluation batches."""

import json
import tracemalloc

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from sft_jax.data import vision, warp
from sft_jax.data.limits import ImageSpec
from sft_jax.hf.image_models import write_preprocessor_config


def _float_image(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)  # [0, 1)


def _pil(channel, out_hw, box=None):
    """PIL's bilinear resize of one float32 [H, W] channel (mode "F") to (height, width)."""
    im = Image.fromarray(channel, mode="F")
    return np.asarray(im.resize(out_hw[::-1], Image.Resampling.BILINEAR, box=box))


def test_filter_taps_by_hand():
    # 4 -> 2: scale 2, so the triangle has half-width 2 input pixels. Output 0 samples x = 0.5:
    # pixels 0, 1, 2 weigh 1 - |i - 0.5| / 2 = 0.75, 0.75, 0.25 (pixel -1, 0.25, is outside:
    # dropped, and the rest renormalized), i.e. 3/7, 3/7, 1/7.
    index, weight = warp.filter_taps(np.array([0.5, 2.5]), 2.0, 4)
    assert index.shape == weight.shape == (2, 5) and weight.dtype == np.float32
    dense = np.zeros((2, 4))
    np.add.at(dense, (np.arange(2)[:, None], index), weight)
    want = np.array([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7
    np.testing.assert_allclose(dense, want, atol=1e-7)
    row = np.array([[0, 7, 14, 21]], np.uint8)
    out = warp.warp(row, warp.resize_matrix((1, 4), (1, 2)), (1, 2))[0, :, 0]
    np.testing.assert_allclose(out, [5.0, 16.0], rtol=1e-6)  # plain bilinear gave 3.5, 17.5


def test_samples_past_the_edge_by_hand():
    # Box x in [-6, 10) of an 8-pixel row onto 4 pixels: scale 4, samples at x = -4.5, -0.5,
    # 3.5, 7.5. The first has no pixel within 4 of it: the edge pixel. The others weigh
    # 1 - |i - x| / 4 over the pixels inside: (0.875, 0.625, 0.375, 0.125) / 2 from the
    # left edge, the symmetric 8 taps / 4, and (0.125, 0.375, 0.625, 0.875) / 2 up to the
    # right edge; all binary fractions, so exact in float32.
    row = np.arange(0, 80, 10, dtype=np.uint8)[None]  # [1, 8]
    out = warp.warp(row, warp.box_matrix((-6, 0, 16, 1), (1, 4)), (1, 4))[0, :, 0]
    np.testing.assert_array_equal(out, [0.0, 8.75, 35.0, 61.25])


@pytest.mark.parametrize(
    "in_hw, out_hw, box",
    [
        ((37, 53), (8, 8), None),  # shrink by 4.625 x 6.625
        ((32, 32), (8, 8), None),  # by 4 exactly
        ((100, 60), (224, 224), None),  # upsample: plain bilinear
        ((20, 50), (30, 7), None),  # up along y, down along x
        ((45, 70), (16, 12), (5.5, 3.0, 50.5, 38.25)),  # a crop (x0, y0, x1, y1), shrunk
        ((45, 70), (11, 13), (0.0, 2.5, 70.0, 45.0)),  # a crop that touches the edges
        ((300, 410), (16, 12), (7.25, 4.5, 400.0, 290.0)),  # by 18 x 33: several row bands
    ],
)
def test_resize_matches_pil_float(in_hw, out_hw, box):
    image = _float_image(*in_hw, seed=sum(in_hw))
    h, w = in_hw
    x0, y0, x1, y1 = box or (0.0, 0.0, w, h)
    matrix = warp.box_matrix((x0, y0, x1 - x0, y1 - y0), out_hw)
    ours = warp.warp(image, matrix, out_hw)  # [oh, ow, 3]
    assert ours.shape == (*out_hw, 3) and ours.dtype == np.float32
    diff = max(np.abs(ours[..., c] - _pil(image[..., c], out_hw, box)).max() for c in range(3))
    print(f"{in_hw} -> {out_hw} box {box}: max abs diff vs PIL {diff:.1e}")
    assert diff <= 1e-5
    # Flipping samples the mirrored box of the mirrored image.
    flip = warp.box_matrix((x0, y0, x1 - x0, y1 - y0), out_hw, flip=True)
    flipped = warp.warp(image, flip, out_hw)
    mirrored = (w - x1, y0, w - x0, y1)
    ref = _pil(np.ascontiguousarray(image[:, ::-1, 0]), out_hw, mirrored)
    assert np.abs(flipped[..., 0] - ref).max() <= 1e-5


@pytest.mark.parametrize("hw, size", [((20000, 40), 64), ((40, 20000), 16)])  # up, down
def test_resize_reads_only_the_view_of_a_long_image(hw, size):
    """The evaluation view of a very tall or wide image (its centred square) is resampled
    from the pixels its filter reads, not from whole rows or columns of the image: memory
    and time follow the view (here ~0.1 MB of float32), not the image (20000 x 40)."""
    image = _float_image(*hw, seed=7)[..., :1]
    h, w = hw
    box = warp.center_square(h, w)
    tracemalloc.start()
    ours = warp.warp(image, warp.box_matrix(box, size), size)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{hw} -> {size}: peak {peak / 2**20:.2f} MiB, image {image.nbytes / 2**20:.2f} MiB")
    assert peak < 2**19
    x0, y0, bw, bh = box
    ref = _pil(image[..., 0], (size, size), (x0, y0, x0 + bw, y0 + bh))
    assert np.abs(ours[..., 0] - ref).max() <= 1e-5


def test_shrinking_differs_from_plain_bilinear_and_sheared_views_do_not_antialias():
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    matrix = warp.resize_matrix((32, 32), 8)
    tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]

    def torch_resize(antialias):
        out = torch.nn.functional.interpolate(
            tensor, size=(8, 8), mode="bilinear", align_corners=False, antialias=antialias
        )
        return out[0].permute(1, 2, 0).numpy()

    ours = warp.warp(image, matrix, 8)
    np.testing.assert_allclose(ours, torch_resize(True), atol=1e-3)  # torch's PIL-style filter
    assert np.abs(ours - torch_resize(False)).max() > 10
    # The general path (sheared maps that do not shrink) is plain bilinear.
    general = warp.warp(image, matrix, 8, _force_general=True)
    np.testing.assert_allclose(general, torch_resize(False), atol=1e-3)


def test_sheared_views_that_shrink_are_anti_aliased():
    """A 1-pixel checkerboard shrunk 16x under shear: plain bilinear samples it (aliasing);
    the view is grey, as the unsheared anti-aliased view is."""
    yy, xx = np.mgrid[0:1600, 0:1600]
    checker = (((yy + xx) % 2) * 255).astype(np.uint8)
    matrix = warp.box_matrix((0, 0, 1600, 1600), 100, shear_degrees=(10, -7), flip=True)
    inner = (slice(20, 80), slice(20, 80))  # away from the edges the shear pulls in
    view = warp.warp(checker, matrix, 100)[inner]
    plain = warp.warp(checker, matrix, 100, _force_general=True)[inner]
    assert np.abs(view - 127.5).max() < 0.5 and plain.std() > 30


def test_sheared_shrink_geometry():
    """The shrink-then-shear path samples where the map says: a vanishing shear gives the
    axis-aligned view; on a linear ramp (which filtering leaves as it is, away from the image's
    edges) it equals plain bilinear sampling; a view reaching past the image replicates edges."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for flip in (False, True):
        box = (50.5, 20.0, 300.0, 250.0)
        aligned = warp.warp(image, warp.box_matrix(box, 37, flip=flip), 37)
        tiny = warp.warp(image, warp.box_matrix(box, 37, flip=flip, shear_degrees=(1e-7, 0)), 37)
        np.testing.assert_allclose(tiny, aligned, atol=1e-3)
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float32)
    ramp = 0.5 * xx + 0.2 * yy
    matrix = warp.box_matrix((100, 80, 200, 150), 40, shear_degrees=(12, -9), flip=True)
    np.testing.assert_allclose(
        warp.warp(ramp, matrix, 40), warp.warp(ramp, matrix, 40, _force_general=True), atol=1e-2
    )
    outside = warp.warp(image, warp.box_matrix((-150, 250, 300, 200), 30, shear_degrees=(9, 4)), 30)
    assert outside.shape == (30, 30, 3) and 0 <= outside.min() and outside.max() <= 255


@pytest.mark.parametrize("transpose", [False, True])
def test_sheared_view_that_shrinks_one_axis_interpolates_the_other_once(transpose):
    """A sheared view that shrinks one axis only (x by 8, y enlarged by 1.6, and transposed):
    the other axis is sampled once, bilinearly, as without shear, not resampled onto the
    grid and then interpolated again. Lines constant along the shrunk axis (which its filter
    leaves as they are) give plain bilinear sampling; a vanishing shear gives the
    axis-aligned view."""
    rng = np.random.default_rng(5)
    lines = np.repeat(rng.integers(0, 256, (60, 1, 1), dtype=np.uint8), 200, axis=1)  # [60, 200]
    image = rng.integers(0, 256, (60, 200, 3), dtype=np.uint8)
    box, out, shear = (10.0, 5.3, 160.0, 40.0), (64, 20), (8.0, -6.0)
    if transpose:
        lines, image = lines.transpose(1, 0, 2), image.transpose(1, 0, 2)
        box, out, shear = (5.3, 10.0, 40.0, 160.0), (20, 64), (-6.0, 8.0)
    matrix = warp.box_matrix(box, out, shear_degrees=shear, flip=True)
    assert max(warp._shrink_factors(matrix)) == 8 and min(warp._shrink_factors(matrix)) < 1
    np.testing.assert_allclose(
        warp.warp(lines, matrix, out), warp.warp(lines, matrix, out, _force_general=True), atol=1e-3
    )
    aligned = warp.warp(image, warp.box_matrix(box, out, flip=True), out)
    tiny = warp.warp(image, warp.box_matrix(box, out, flip=True, shear_degrees=(1e-7, 1e-7)), out)
    np.testing.assert_allclose(tiny, aligned, atol=1e-3)


# ---------------------------------------------------------------------------- exported processor

SPEC_MEAN, SPEC_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PIL resizes uint8 images in two passes (along x, then y), rounding to 8 bits after each: each
# rounding moves a pixel by at most 0.5 / 255, and the vertical pass's weights (positive, summing
# to 1) carry the first one through, so at most 1 / 255 before normalization, 1 / 255 / std after
# (measured: exactly that bound for 28 -> 56, whose weights are binary fractions). 1e-3 / 255
# covers PIL's 22-bit fixed-point weights.
TOL = (1 + 1e-3) / 255 / min(SPEC_STD)


def _smooth(h, w):
    """A smooth uint8 [h, w, 3] pattern (periods of 25 pixels and more) with distinct sides."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    c = np.arange(3)
    x, y = x[..., None], y[..., None]  # [h, w, 1]
    v = 127.5 + 100 * np.sin(x / 4 + c) * np.cos(y / 5 - c) + 20 * x / w
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


def _eval_view(image, size):
    """Our evaluation batch row (the trainer's evaluation path): [S, S, 3] normalized."""
    spec = ImageSpec(size, SPEC_MEAN, SPEC_STD, "test")
    ds = vision.image_cls_dataset(
        [{"image": image, "label": 0}], spec, image_size=None, batch_size=1, train=False,
        augment=None, seed=0, shuffle=True, drop_remainder=False,
    )  # fmt: skip
    return ds[0]["pixel_values"][0]


def _processor_view(image, out_dir):
    processor = transformers.AutoImageProcessor.from_pretrained(out_dir, backend="pil")
    pixels = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    return pixels.transpose(1, 2, 0), processor  # [S, S, 3]


@pytest.mark.parametrize(
    "hw, size",
    [
        ((48, 80), 24),  # landscape: long edge 80 * 24 / 48 = 40, crop offset (40 - 24) / 2 = 8
        ((80, 48), 24),  # portrait
        ((50, 75), 20),  # shrink by 2.5: long edge 30, crop offset 5
        ((64, 64), 16),  # square, shrink by 4
        ((28, 28), 56),  # square upsample (Fashion-MNIST-like)
    ],
)
def test_exported_processor_matches_eval_batches(tmp_path, hw, size):
    image = _smooth(*hw)
    spec = ImageSpec(size, SPEC_MEAN, SPEC_STD, "test")
    write_preprocessor_config(spec, tmp_path)
    got, processor = _processor_view(image, tmp_path)
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    want = _eval_view(image, size)
    diff = np.abs(got - want).max()
    print(f"{hw} -> {size}: exported processor vs eval batch: max abs diff {diff:.4f} <= {TOL:.4f}")
    assert got.shape == want.shape == (size, size, 3) and diff <= TOL
    if hw[0] != hw[1]:
        # The old config (ViTImageProcessor squashing to S x S) feeds the model other pixels.
        config = json.loads((tmp_path / "preprocessor_config.json").read_text())
        del config["crop_size"], config["do_center_crop"]
        square = {"height": size, "width": size}
        config.update(image_processor_type="ViTImageProcessor", size=square)
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
        squashed, _ = _processor_view(image, tmp_path)
        assert np.abs(squashed - want).max() > 1.0
