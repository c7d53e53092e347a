"""ResNet image classifiers (He et al., 2015) in Flax NNX, named like Hugging Face's modules.

Matches ``transformers``' ``ResNetModel`` / ``ResNetForImageClassification`` (the layout of
microsoft/resnet-18 ... resnet-152): a 7x7/2 conv stem and 3x3/2 max pool, then stages of basic
(two 3x3 convs) or bottleneck (1x1 -> 3x3 -> 1x1, 4x channel reduction) residual layers, every
conv followed by torch-semantics BatchNorm (momentum 0.1, eps 1e-5), a projection shortcut
(1x1 conv + BN) where the shape changes, global average pooling and a linear head.

Attribute paths mirror ``transformers`` (``embedder.embedder.convolution``,
``encoder.stages.{s}.layers.{l}.layer.{k}.normalization``, ``...shortcut.convolution``) so the
import table in ``sft_jax.hf.resnet`` only renames leaves. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import layers, remat
from sft_jax.models.config_base import HFConfig
from sft_jax.models.conv import BatchNorm, Conv2d, global_avg_pool, max_pool
from sft_jax.models.heads import HeadConfig, ImageHead, LayerStructure
from sft_jax.models.layers import Array

LAYER_TYPES = ("basic", "bottleneck")
BOTTLENECK_REDUCTION = 4  # bottleneck width = out_channels // 4 (transformers' `reduction`)


@dataclasses.dataclass(frozen=True)
class ResNetConfig(HFConfig):
    """ResNet hyperparameters, with Hugging Face ``ResNetConfig`` field names.

    ``num_labels`` is the size of the checkpoint's own classifier (``len(id2label)`` in
    ``config.json``); ``dtype`` / ``param_dtype`` are ours.
    """

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    num_labels: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type={self.layer_type!r}; use one of {LAYER_TYPES}")
        if not self.depths or len(self.depths) != len(self.hidden_sizes):
            raise ValueError(
                f"depths {self.depths} and hidden_sizes {self.hidden_sizes} need the same "
                "(non-zero) length: one entry per stage"
            )
        layers.get_activation(self.hidden_act)  # fail early on an unknown activation
        self._normalize_dtypes()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> ResNetConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        ``num_labels`` comes from ``id2label`` (as transformers derives it), else ``num_labels``.
        """
        kwargs = cls.hf_kwargs(d)
        if isinstance(d.get("id2label"), dict) and d["id2label"]:
            kwargs["num_labels"] = len(d["id2label"])
        return cls(**{**kwargs, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """Hugging Face config fields (``model_type`` included; dtypes and ``num_labels``,
        which the exporter writes as ``id2label``, excluded)."""
        d = self.hf_fields()
        d.pop("num_labels")
        d["hidden_sizes"], d["depths"] = list(self.hidden_sizes), list(self.depths)
        return {"model_type": "resnet", **d}

    @classmethod
    def resnet_50(cls, **overrides: Any) -> ResNetConfig:
        """microsoft/resnet-50: bottleneck [3, 4, 6, 3], 1000 classes, ~25.6M params."""
        return cls(**{"num_labels": 1000, **overrides})

    @classmethod
    def resnet_18(cls, **overrides: Any) -> ResNetConfig:
        """microsoft/resnet-18: basic [2, 2, 2, 2], widths 64..512, 1000 classes, ~11.7M params."""
        kw = dict(
            hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2), layer_type="basic",
            num_labels=1000,
        )  # fmt: skip
        return cls(**{**kw, **overrides})


PRESETS = {"resnet-50": ResNetConfig.resnet_50, "resnet-18": ResNetConfig.resnet_18}


class ResNetConvLayer(nnx.Module):
    """Conv (no bias, padding k // 2) -> BatchNorm -> activation (None: no activation)."""

    def __init__(
        self,
        cfg: ResNetConfig,
        n_in: int,
        n_out: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        activation: str | None = "relu",
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.convolution = Conv2d(
            n_in, n_out, kernel_size, stride=stride, padding=kernel_size // 2, use_bias=False,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip
        self.normalization = BatchNorm(n_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """[B, H, W, n_in] -> [B, H / stride, W / stride, n_out]."""
        x = self.normalization(self.convolution(x), train=train)
        return x if self.activation is None else layers.get_activation(self.activation)(x)


class ResNetShortCut(nnx.Module):
    """Projection shortcut: 1x1 conv (with the layer's stride) -> BatchNorm."""

    def __init__(self, cfg: ResNetConfig, n_in: int, n_out: int, stride: int, *, rngs: nnx.Rngs):
        self.convolution = Conv2d(
            n_in, n_out, 1, stride=stride, padding=0, use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip
        self.normalization = BatchNorm(n_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        return self.normalization(self.convolution(x), train=train)


class ResNetResidualLayer(nnx.Module):
    """A basic or bottleneck residual layer: ``act(layer(x) + shortcut(x))``.

    ``layer`` holds the convs: basic ``[3x3/stride, 3x3]``; bottleneck ``[1x1, 3x3/stride,
    1x1]`` (the stride on the first 1x1 with ``downsample_in_bottleneck``). As in
    transformers, the inner convs use ReLU whatever ``hidden_act`` is; ``hidden_act`` applies
    after the residual sum. ``shortcut`` is None (identity) when shapes already agree.
    """

    def __init__(self, cfg: ResNetConfig, n_in: int, n_out: int, stride: int, *, rngs: nnx.Rngs):
        self.activation = cfg.hidden_act
        self.shortcut = (
            ResNetShortCut(cfg, n_in, n_out, stride, rngs=rngs)
            if n_in != n_out or stride != 1
            else None
        )
        conv = lambda a, b, **kw: ResNetConvLayer(cfg, a, b, rngs=rngs, **kw)  # noqa: E731
        if cfg.layer_type == "basic":
            convs = [conv(n_in, n_out, stride=stride), conv(n_out, n_out, activation=None)]
        else:
            mid = n_out // BOTTLENECK_REDUCTION
            s1, s2 = (stride, 1) if cfg.downsample_in_bottleneck else (1, stride)
            convs = [
                conv(n_in, mid, kernel_size=1, stride=s1),
                conv(mid, mid, stride=s2),
                conv(mid, n_out, kernel_size=1, activation=None),
            ]
        self.layer = nnx.List(convs)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """[B, H, W, n_in] -> [B, H / stride, W / stride, n_out]."""
        h = x
        for conv in self.layer:
            h = conv(h, train=train)
        residual = x if self.shortcut is None else self.shortcut(x, train=train)
        return layers.get_activation(self.activation)(h + residual)


class ResNetStage(nnx.Module):
    """``depth`` residual layers; the first changes width and applies the stage's stride."""

    def __init__(
        self,
        cfg: ResNetConfig,
        n_in: int,
        n_out: int,
        stride: int,
        depth: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.layers = nnx.List(
            [ResNetResidualLayer(cfg, n_in, n_out, stride, rngs=rngs)]
            + [ResNetResidualLayer(cfg, n_out, n_out, 1, rngs=rngs) for _ in range(depth - 1)]
        )

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        for layer in self.layers:
            x = remat.apply(layer, x, call=lambda layer, x: layer(x, train=train))
        return x


class ResNetEncoder(nnx.Module):
    """The stages, in ``stages``; every stage but the first halves the resolution."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        widths = (cfg.embedding_size, *cfg.hidden_sizes)
        strides = [2 if cfg.downsample_in_first_stage else 1] + [2] * (len(cfg.depths) - 1)
        self.stages = nnx.List(
            [
                ResNetStage(cfg, widths[i], widths[i + 1], strides[i], cfg.depths[i], rngs=rngs)
                for i in range(len(cfg.depths))
            ]
        )

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        for stage in self.stages:
            x = stage(x, train=train)
        return x


class ResNetEmbeddings(nnx.Module):
    """The stem: ``embedder`` (7x7/2 conv -> BN -> hidden_act), then a 3x3/2 max pool."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.embedder = ResNetConvLayer(
            cfg, cfg.num_channels, cfg.embedding_size, kernel_size=7, stride=2,
            activation=cfg.hidden_act, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """[B, H, W, C] -> [B, H / 4, W / 4, embedding_size]."""
        return max_pool(self.embedder(x, train=train), 3, 2, 1)


class ResNetModel(nnx.Module):
    """ResNet backbone: stem (``embedder``), ``encoder`` stages, global average pooling.

    Args:
        config: Model hyperparameters.
        rngs: RNG streams for initialization.
    """

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = ResNetEmbeddings(config, rngs=rngs)
        self.encoder = ResNetEncoder(config, rngs=rngs)

    def __call__(self, pixel_values: Array, *, train: bool = False) -> Array:
        """Pooled features: [B, H, W, num_channels] -> [B, hidden_sizes[-1]].

        Args:
            pixel_values: Normalized images, NHWC.
            train: BatchNorm normalizes with (and updates) batch statistics.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected NHWC "
                f"[B, H, W, {self.config.num_channels}]"
            )
        x = self.embedder(pixel_values, train=train)  # [B, H/4, W/4, embedding_size]
        x = self.encoder(x, train=train)  # [B, H/32, W/32, hidden_sizes[-1]] (ResNet-50)
        return global_avg_pool(x)


class ResNetForImageClassification(nnx.Module):
    """ResNet backbone (``resnet``) + image head (``classifier``).

    Args:
        config: Backbone hyperparameters; ``config.num_labels`` sizes the head when
            ``head.num_labels`` is None (the checkpoint's own head).
        head: Head kind, classes, hidden width and dropout.
        rngs: RNG streams for initialization.
        label_names: Optional class names (kept for export).
    """

    layer_structure = LayerStructure(
        blocks=r"^resnet/encoder/stages/(\d+)/", bottom=r"^resnet/embedder/", top=None
    )

    def __init__(
        self,
        config: ResNetConfig,
        head: HeadConfig,
        *,
        rngs: nnx.Rngs,
        label_names: tuple[str, ...] | None = None,
    ):
        num_labels = config.num_labels if head.num_labels is None else head.num_labels
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        self.config = config
        self.head_config = head
        self.num_labels = int(num_labels)
        self.label_names = None if label_names is None else tuple(label_names)
        self.resnet = ResNetModel(config, rngs=rngs)
        self.classifier = self.new_classifier(rngs)

    def new_classifier(self, rngs: nnx.Rngs) -> ImageHead:
        """A freshly initialized head as ``head_config`` describes (the loaders build the
        backbone abstractly and fill it from the checkpoint; only a new head needs values)."""
        cfg = self.config
        return ImageHead(
            cfg.hidden_sizes[-1], self.num_labels, self.head_config, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(
        self, pixel_values: Array, *, train: bool = False, dropout_rng: jax.Array | None = None
    ) -> Array:
        """Classifies images: [B, H, W, num_channels] float32 -> logits [B, num_labels] float32.

        Args:
            pixel_values: Normalized images, NHWC.
            train: BatchNorm in training mode; with ``dropout_rng`` also the head's dropout.
            dropout_rng: PRNG key for dropout (used only with ``train``).
        """
        features = self.resnet(pixel_values, train=train)  # [B, C]
        rng = dropout_rng if train else None
        return self.classifier(features, dropout_rng=rng).astype(jnp.float32)
