"""Image decoding, resampling, augmentation and normalization, and the grain batch pipeline.

`image_cls_dataset` turns a random access source of image classification records
(`{"image": uint8 [H, W, C] or PNG bytes, "label": int}`, see `sft_jax.data.image_builders`)
into a `grain.MapDataset` of numpy batches:

    pixel_values  float32 [B, S, S, 3]  NHWC, (x / 255 - mean) / std per channel
    labels        int32   [B]
    example_mask  float32 [B]           1 for real examples, 0 for filler rows

Every geometric step (resize, random resized crop, translation, shear, horizontal flip) is one
2x3 affine matrix that maps *output* pixel centres to *input* coordinates, and one function,
`warp`, resamples with it. Coordinates are (x = column, y = row) with pixel `i` centred at `i`;
a plain resize is `x_in = (x_out + 0.5) * in / out - 0.5` (PIL, and torch's
`interpolate(bilinear, align_corners=False)`). Samples outside the image take the nearest
edge pixel (replicate padding), which is also what that resize convention needs at the
borders. Bilinear interpolation does not low-pass filter, so large downsampling factors alias;
upsampling (Fashion-MNIST 28 -> 112 / 224) is exact bilinear.

Augmentation (training only) draws each example's parameters, in batch order, from one
generator per batch seeded by (seed, batch index in the stream) via grain's `random_map`, so
batch `i` is a fixed function of the seed and every epoch sees new views. Evaluation takes the
centred square of side min(H, W) (the whole image when it is square), resized to S x S.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from sft_jax.data.limits import ImageSpec

Box = tuple[float, float, float, float]  # (x0, y0, width, height) in input pixel-edge units


# ---------------------------------------------------------------------------- transforms


def to_rgb(image: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, 1] grey -> [H, W, 3] by repeating; [H, W, 3] is returned as is;
    [H, W, 4] drops alpha (like Pillow's `convert("RGB")`, which the builders use). Any dtype."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[-1] if image.ndim == 3 else 0
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 3:
        return image
    if channels == 4:
        return image[..., :3]
    raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got shape {image.shape}")


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`(image - mean) / std` per channel (last axis), float32; `image` holds [0, 1] values."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((np.asarray(image, np.float32) - mean) / std).astype(np.float32)


def _size(out_size: int | Sequence[int]) -> tuple[int, int]:
    return (out_size, out_size) if isinstance(out_size, (int, np.integer)) else tuple(out_size)


def _axis_weights(coords: np.ndarray, n: int):
    """Bilinear taps along one axis: (lower index, upper index, weight of the upper) with
    indices clamped to [0, n - 1] (replicated edges); weights float32 [..., 1]."""
    lower = np.floor(coords)
    weight = (coords - lower).astype(np.float32)[..., None]
    lower = lower.astype(np.intp)
    return np.clip(lower, 0, n - 1), np.clip(lower + 1, 0, n - 1), weight


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    return a + (b.astype(np.float32, copy=False) - a) * t  # exact at t = 0 and t = 1


def warp(
    image: np.ndarray,
    matrix: np.ndarray,
    out_size: int | Sequence[int],
    *,
    _force_general: bool = False,  # tests: check the axis-aligned path against the general one
) -> np.ndarray:
    """Bilinear resampling of `image` under an affine map, edges replicated.

    Args:
      image: uint8 (or any real dtype) [H, W, C] or [H, W].
      matrix: 2x3; `[x_in, y_in] = matrix @ [x_out, y_out, 1]` for output pixel centres.
      out_size: S (square) or (height, width).

    Returns:
      float32 [S, S, C] in the input's value range (not rounded).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    oh, ow = _size(out_size)
    m = np.asarray(matrix, np.float64)
    xs = np.arange(ow, dtype=np.float64)
    ys = np.arange(oh, dtype=np.float64)
    if m[0, 1] == 0 and m[1, 0] == 0 and not _force_general:
        # Axis-aligned (resize, crop, flip): interpolate along x on the input rows, then along
        # y. The same float32 operations on the same values as the general path below, so the
        # result is bit-identical, with far fewer gathers.
        xa, xb, wx = _axis_weights(m[0, 0] * xs + m[0, 2], w)  # [ow], [ow], [ow, 1]
        ya, yb, wy = _axis_weights(m[1, 1] * ys + m[1, 2], h)  # [oh], [oh], [oh, 1]
        cols = _lerp(image[:, xa], image[:, xb], wx)  # [H, ow, C]
        return _lerp(cols[ya], cols[yb], wy[..., None])  # [oh, ow, C]
    return _warp_general(image, m, xs, ys)


def _warp_general(image: np.ndarray, m: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Any affine map: four gathers per output pixel from the image padded by one replicated
    pixel, so that coordinates clamped to [-1, W - 1] need no per-tap index clipping."""
    h, w, c = image.shape
    wp = w + 2
    # A small image is converted to float32 once, rather than the four [S, S, C] gathers.
    small = h * w <= 4 * len(xs) * len(ys)
    padded = np.empty((h + 2, wp, c), np.float32 if small else image.dtype)
    padded[1:-1, 1:-1] = image
    padded[0, 1:-1], padded[-1, 1:-1] = image[0], image[-1]
    padded[:, 0], padded[:, -1] = padded[:, 1], padded[:, -2]
    flat = padded.reshape(-1, c)  # [(H + 2) * (W + 2), C]
    if c == 1:
        flat = flat[:, 0]  # 1-D gathers are several times faster than row gathers
    x_in = np.clip((m[0, 0] * xs + m[0, 2])[None, :] + (m[0, 1] * ys)[:, None], -1, w - 1)
    y_in = np.clip((m[1, 0] * xs)[None, :] + (m[1, 1] * ys + m[1, 2])[:, None], -1, h - 1)
    x0, y0 = np.floor(x_in), np.floor(y_in)  # [S, S]
    wx = (x_in - x0).astype(np.float32)
    wy = (y_in - y0).astype(np.float32)
    if c != 1:
        wx, wy = wx[..., None], wy[..., None]  # [S, S, 1]
    y0 *= wp  # flat index of the top-left tap, computed in place (exact in float64)
    y0 += x0
    y0 += wp + 1
    tl = y0.astype(np.intp)
    top = _lerp(flat[tl], flat[tl + 1], wx)  # [S, S(, C)]
    bottom = _lerp(flat[tl + wp], flat[tl + (wp + 1)], wx)
    out = top + (bottom - top) * wy
    return out[..., None] if c == 1 else out


def box_matrix(
    box: Box,
    out_size: int | Sequence[int],
    *,
    flip: bool = False,
    shear_degrees: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The 2x3 matrix that maps an output grid onto a box of the input.

    Args:
      box: (x0, y0, width, height) in input pixel-edge units: the whole image is (0, 0, W, H).
        It may reach past the image (translation): those samples replicate the edge.
      out_size: S or (height, width) of the output.
      flip: mirror horizontally (output column j samples the box's column from the right).
      shear_degrees: (x, y) shear angles about the box centre, in input pixels:
        x_in += tan(ax) * dy, y_in += tan(ay) * dx for offsets (dx, dy) from the centre.

    Returns:
      float64 [2, 3] for `warp`.
    """
    bx, by, bw, bh = (float(v) for v in box)
    oh, ow = _size(out_size)
    # Pixel-centre convention per axis: x_in = bx + bw * u - 0.5 with u = (x_out + 0.5) / ow,
    # or u -> 1 - u when flipped. Written out (not as a product of matrices) so that a plain
    # resize or a flip has exact coefficients.
    sx, sy = bw / ow, bh / oh
    tx = bx - 0.5 + (bw - 0.5 * sx if flip else 0.5 * sx)
    m = np.array([[-sx if flip else sx, 0.0, tx], [0.0, sy, by - 0.5 + 0.5 * sy]])
    ax, ay = shear_degrees
    if ax or ay:
        cx, cy = bx + bw / 2 - 0.5, by + bh / 2 - 0.5  # box centre, pixel-centre units
        shear = np.array([[1.0, math.tan(math.radians(ax))], [math.tan(math.radians(ay)), 1.0]])
        m = shear @ (m - np.array([[0, 0, cx], [0, 0, cy]]))
        m[:, 2] += (cx, cy)
    return m


def resize_matrix(in_hw: Sequence[int], out_size: int | Sequence[int]) -> np.ndarray:
    """The plain resize of a whole [H, W] image: `box_matrix((0, 0, W, H), out_size)`."""
    h, w = in_hw
    return box_matrix((0.0, 0.0, float(w), float(h)), out_size)


def center_square(h: int, w: int) -> Box:
    """The centred square box of side min(h, w) (the evaluation view)."""
    side = min(h, w)
    return ((w - side) / 2, (h - side) / 2, float(side), float(side))


# ---------------------------------------------------------------------------- augmentation


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, all folded into one affine warp per image.

    Attributes:
      enabled: augment training batches at all.
      scale: (min, max) area of the random crop as a fraction of the image, 0 < min <= max <= 1.
      ratio: (min, max) aspect ratio (width / height) of the crop, drawn log-uniformly.
      shear_degrees: x and y shear angles each uniform in [-shear_degrees, shear_degrees].
      hflip: mirror horizontally with probability 0.5.
      translate: shift the crop by up to this fraction of the image width / height.
    """

    enabled: bool = False
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    shear_degrees: float = 0.0
    hflip: bool = True
    translate: float = 0.0

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"data.augment.scale must satisfy 0 < min <= max <= 1; got {self.scale}"
            )
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"data.augment.ratio must satisfy 0 < min <= max; got {self.ratio}")
        if not 0 <= self.shear_degrees < 45:
            raise ValueError(
                f"data.augment.shear_degrees must be in [0, 45); got {self.shear_degrees}"
            )
        if not 0 <= self.translate < 1:
            raise ValueError(f"data.augment.translate must be in [0, 1); got {self.translate}")

    @classmethod
    def from_config(cls, cfg: Any) -> "AugmentConfig":
        """From an `AugmentConfig`, None (disabled) or a mapping / ConfigDict with the same
        keys (`enabled`, `scale`, `ratio`, `shear_degrees`, `hflip`, `translate`); missing
        keys take the defaults, unknown keys are errors."""
        if cfg is None or isinstance(cfg, cls):
            return cfg or cls()
        values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown data.augment keys {sorted(unknown)}")
        for key in ("scale", "ratio"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


def sample_crop(rng: np.random.Generator, h: int, w: int, scale, ratio) -> Box:
    """A random resized crop box (torchvision's RandomResizedCrop, without pixel rounding):
    up to 10 draws of area and log-aspect; then the centre crop with the ratio clamped."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        bw, bh = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < bw <= w and 0 < bh <= h:
            return (rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh)
    in_ratio = w / h
    bw, bh = float(w), float(h)
    if in_ratio < ratio[0]:
        bh = bw / ratio[0]
    elif in_ratio > ratio[1]:
        bw = bh * ratio[1]
    return ((w - bw) / 2, (h - bh) / 2, bw, bh)


def augment_matrix(
    rng: np.random.Generator, h: int, w: int, out_size: int, aug: AugmentConfig
) -> np.ndarray:
    """One random training view of an [h, w] image as a `warp` matrix."""
    x0, y0, bw, bh = sample_crop(rng, h, w, aug.scale, aug.ratio)
    if aug.translate:
        x0 += rng.uniform(-aug.translate, aug.translate) * w
        y0 += rng.uniform(-aug.translate, aug.translate) * h
    shear = (0.0, 0.0)
    if aug.shear_degrees:
        shear = tuple(rng.uniform(-aug.shear_degrees, aug.shear_degrees, size=2).tolist())
    flip = bool(aug.hflip and rng.random() < 0.5)
    return box_matrix((x0, y0, bw, bh), out_size, flip=flip, shear_degrees=shear)


# ---------------------------------------------------------------------------- pipeline


def decode(image: Any) -> np.ndarray:
    """A record's image as uint8 [H, W, C]: arrays pass through; encoded bytes (PNG, JPEG,
    ...) are decoded with Pillow, modes other than grey and RGB converted to RGB."""
    if isinstance(image, (bytes, np.bytes_)):
        with Image.open(io.BytesIO(image)) as im:
            image = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    image = np.asarray(image)
    return image[..., None] if image.ndim == 2 else image


def view_pixels(
    record: Mapping[str, Any],
    size: int,
    rng: np.random.Generator | None = None,
    augment: AugmentConfig | None = None,
) -> np.ndarray:
    """A record's image resampled to float32 [S, S, C] (0..255, C = 1 or 3): a random view
    when `rng` and `augment` are given, else the evaluation view (centred square)."""
    image = decode(record["image"])  # [H, W, C]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"record id {record.get('id')}: image of shape {image.shape}")
    h, w = image.shape[:2]
    if rng is not None and augment is not None:
        matrix = augment_matrix(rng, h, w, size, augment)
    else:
        matrix = box_matrix(center_square(h, w), size)
    # Before to_rgb: a grey image is resampled once, not three times.
    return warp(image[..., :3], matrix, size)


def read_records(source: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> list:
    """`[source[i] for i in indices]`, through `source.__getitems__` when it has one (tfds
    array_record sources read a batch in parallel, ~10x faster than one by one)."""
    getitems = getattr(source, "__getitems__", None)
    return list(getitems(indices)) if getitems else [source[i] for i in indices]


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Grain map over a batch of source indices: read, resample, to_rgb, normalize into
    [B, S, S, 3]; rows past the last index are zeros with label 0 and `example_mask` 0.

    Called with a generator (grain `random_map`, seeded by (seed, batch position)), it draws
    each example's augmentation from it in order."""

    source: Sequence[Mapping[str, Any]]
    batch_size: int
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: AugmentConfig | None = None

    def __call__(self, indices: Sequence[int], rng: np.random.Generator | None = None):
        records = read_records(self.source, [int(i) for i in indices])
        n, s = len(records), self.size
        # (x / 255 - mean) / std as one multiply-add, x * scale + offset, on rows viewed as
        # [S, S * 3] with the per-channel factors tiled along them: numpy is slow when the
        # innermost (broadcast) axis has length 3.
        scale = np.tile(1 / (255 * np.asarray(self.std)), s).astype(np.float32)  # [S * 3]
        offset = np.tile(-np.asarray(self.mean) / self.std, s).astype(np.float32)
        pixel_values = np.empty((self.batch_size, s, s, 3), np.float32)  # [B, S, S, 3]
        for i, record in enumerate(records):
            pixels = to_rgb(view_pixels(record, s, rng, self.augment))  # [S, S, 3]
            row = pixel_values[i].reshape(s, s * 3)
            np.multiply(pixels.reshape(s, s * 3), scale, out=row)
            row += offset
        pixel_values[n:] = 0.0
        labels = np.zeros(self.batch_size, np.int32)  # [B]
        labels[:n] = [int(r["label"]) for r in records]
        example_mask = np.zeros(self.batch_size, np.float32)  # [B]
        example_mask[:n] = 1.0
        return {"pixel_values": pixel_values, "labels": labels, "example_mask": example_mask}


def image_cls_dataset(
    source: Sequence[Mapping[str, Any]],
    spec: ImageSpec,
    *,
    image_size: int | None,
    batch_size: int,
    train: bool,
    augment: AugmentConfig | Mapping[str, Any] | None,
    seed: int,
    shuffle: bool,
    drop_remainder: bool,
    num_epochs: int | None = 1,
) -> grain.MapDataset:
    """Decoded, resized (augmented when training), normalized batches of an image source.

    Each epoch is shuffled with its own seed yet reproducibly; `ds[i]` is always batch `i`
    (augmentation included: drawn from a generator seeded by (seed, i)), so a trainer resumes
    by indexing or by iterator state, and every epoch sees new views. `len(ds)` is
    `num_batches(len(source), batch_size, drop_remainder) * num_epochs`.

    Args:
      source: records with `image` (uint8 [H, W, 1|3] or encoded bytes) and `label`.
      spec: the checkpoint's input spec: mean / std, and the size when `image_size` is None.
      image_size: output side S; None or 0 takes `spec.size`.
      batch_size: rows per batch (B).
      train: apply `augment` (when enabled); evaluation batches are never augmented.
      augment: `AugmentConfig`, a `data.augment` config block, or None.
      seed: shuffle and augmentation seed.
      shuffle: shuffle examples.
      drop_remainder: drop a last short batch (training) or fill it with zero rows whose
        `example_mask` is 0 (evaluation).
      num_epochs: passes over the data; None repeats forever.

    Returns:
      A `grain.MapDataset` of batch dicts (see the module docstring).
    """
    size = int(image_size or spec.size)
    aug = AugmentConfig.from_config(augment)
    augmenting = train and aug.enabled
    load = _Batch(
        source, batch_size, size, tuple(spec.mean), tuple(spec.std), aug if augmenting else None
    )
    # Indices are shuffled and batched first, so that each batch is read with one call.
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
    ds = ds.random_map(load, seed=seed) if augmenting else ds.map(load)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the shuffle and the augmentation every epoch
    return ds
