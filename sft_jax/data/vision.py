"""Image decoding, resampling, augmentation and normalization, and the grain batch pipeline.

`image_cls_dataset` turns a random access source of image classification records
(`{"image": uint8 [H, W, C] or PNG bytes, "label": int}`, see `sft_jax.data.image_builders`)
into a `grain.MapDataset` of numpy batches:

    pixel_values  float32 [B, S, S, 3]  NHWC, (x / 255 - mean) / std per channel
    labels        int32   [B]
    example_mask  float32 [B]           1 for real examples, 0 for filler rows

Every geometric step (resize, random resized crop, translation, shear, horizontal flip) is one
affine matrix resampled by `sft_jax.data.warp.warp` (Pillow's anti-aliased BILINEAR filter for
axis-aligned views; see that module).

Augmentation (training only) draws each example's parameters, in batch order, from one
generator per batch seeded by (seed, batch index in the stream) via grain's `random_map`, so
batch `i` is a fixed function of the seed and every epoch sees new views (a process that
builds only some rows of it, `process_rows`, replays the earlier rows' draws). Evaluation takes the
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
from sft_jax.data.records import check_rows, read_records
from sft_jax.data.warp import Box, box_matrix, center_square, warp

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


def image_hw(image: Any) -> tuple[int, int]:
    """A record's image height and width, from an array's shape or an encoded image's header
    (nothing decoded)."""
    if isinstance(image, (bytes, np.bytes_)):
        with Image.open(io.BytesIO(image)) as im:
            return im.height, im.width
    shape = np.shape(image)
    return int(shape[0]), int(shape[1])


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Grain map over a batch of source indices: read, resample, to_rgb, normalize the rows at
    `positions` (`records.check_rows`) into [B, S, S, 3]; rows past the last index are zeros
    with label 0 and `example_mask` 0.

    Called with a generator (grain `random_map`, seeded by (seed, batch position)), it draws
    each example's augmentation from it in order. A process that builds later rows replays the
    draws of the rows before them (from their images' sizes, which decide the crop's retries,
    without decoding them), so its rows are the ones one process would build."""

    source: Sequence[Mapping[str, Any]]
    positions: range
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: AugmentConfig | None = None

    def __call__(self, indices: Sequence[int], rng: np.random.Generator | None = None):
        start, stop = self.positions.start, self.positions.stop
        if rng is not None and self.augment is not None:
            for record in read_records(self.source, indices[:start]):
                augment_matrix(rng, *image_hw(record["image"]), self.size, self.augment)
        records = read_records(self.source, indices[start:stop])
        b, n, s = len(self.positions), len(records), self.size
        # (x / 255 - mean) / std as one multiply-add, x * scale + offset, on rows viewed as
        # [S, S * 3] with the per-channel factors tiled along them: numpy is slow when the
        # innermost (broadcast) axis has length 3.
        scale = np.tile(1 / (255 * np.asarray(self.std)), s).astype(np.float32)  # [S * 3]
        offset = np.tile(-np.asarray(self.mean) / self.std, s).astype(np.float32)
        pixel_values = np.empty((b, s, s, 3), np.float32)  # [B, S, S, 3]
        for i, record in enumerate(records):
            pixels = to_rgb(view_pixels(record, s, rng, self.augment))  # [S, S, 3]
            row = pixel_values[i].reshape(s, s * 3)
            np.multiply(pixels.reshape(s, s * 3), scale, out=row)
            row += offset
        pixel_values[n:] = 0.0
        labels = np.zeros(b, np.int32)  # [B]
        labels[:n] = [int(r["label"]) for r in records]
        example_mask = np.zeros(b, np.float32)  # [B]
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
    process_rows: slice | None = None,
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
      process_rows: build only these rows of every batch, a process's share
        (`sharding.feed_rows`, `sft_jax.data.records`): only their images are decoded and
        resampled. None: all `batch_size` rows.

    Returns:
      A `grain.MapDataset` of batch dicts (see the module docstring).
    """
    size = int(image_size or spec.size)
    aug = AugmentConfig.from_config(augment)
    augmenting = train and aug.enabled
    load = _Batch(
        source,
        check_rows(process_rows, batch_size),
        size,
        tuple(spec.mean),
        tuple(spec.std),
        aug if augmenting else None,
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
