"""Vision Transformer (Dosovitskiy et al., 2020) image classifiers in Flax NNX, named like
Hugging Face's modules.

Matches ``transformers``' ``ViTModel`` / ``ViTForImageClassification``
(google/vit-base-patch16-224): non-overlapping patches embedded by a stride-``patch_size`` conv,
a learned [CLS] token and learned absolute position embeddings, pre-LayerNorm encoder layers, a
final LayerNorm; the classifier reads the [CLS] token after that LayerNorm. ViTModel's tanh
pooler is not built: the image classifier does not use it.

Attribute paths follow the checkpoint layout (``embeddings.patch_embeddings.projection``,
``encoder.layer.{i}.attention.attention.query``, ``...attention.output.dense``,
``...intermediate.dense``, ``...output.dense``, ``layernorm_before/after``, ``layernorm``) so the
import table in ``sft_jax.hf.vit`` only renames leaves. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import attention, dropout, layers, remat
from sft_jax.models.config_base import HFConfig
from sft_jax.models.conv import Conv2d
from sft_jax.models.heads import HeadConfig, ImageHead, LayerStructure
from sft_jax.models.layers import Array


def _square(name: str, value: int | Sequence[int]) -> int:
    """HF allows ``image_size`` / ``patch_size`` as [h, w]; only squares are supported."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise NotImplementedError(f"{name}={list(value)}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig(HFConfig):
    """ViT hyperparameters, with Hugging Face ``ViTConfig`` field names.

    ``num_labels`` is the size of the checkpoint's own classifier (``len(id2label)``);
    ``dtype`` / ``param_dtype`` are ours.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "image_size", _square("image_size", self.image_size))
        object.__setattr__(self, "patch_size", _square("patch_size", self.patch_size))
        layers.get_activation(self.hidden_act)  # fail early on an unknown activation
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} < patch_size {self.patch_size}")
        self._normalize_dtypes()

    @property
    def num_patches(self) -> int:
        """Patches per image at ``image_size`` (the position table has one more row: [CLS])."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> ViTConfig:
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
        return {"model_type": "vit", **d}

    @classmethod
    def vit_b16(cls, **overrides: Any) -> ViTConfig:
        """google/vit-base-patch16-224: 12 layers, hidden 768, 224px, 16px patches, 1000
        classes, ~86.6M params."""
        return cls(**{"num_labels": 1000, **overrides})


PRESETS = {"vit-b16": ViTConfig.vit_b16}


def _layer_norm(cfg: ViTConfig) -> layers.LayerNorm:
    return layers.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
    )


class ViTPatchEmbeddings(nnx.Module):
    """``projection``: a ``patch_size`` conv with stride ``patch_size`` (VALID)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.projection = Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
            padding="VALID", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
        )  # fmt: skip

    def __call__(self, x: Array) -> Array:
        """[B, H, W, C] -> [B, (H / P) * (W / P), hidden], patches in row-major order."""
        y = self.projection(x)  # [B, H/P, W/P, hidden]
        return y.reshape(y.shape[0], -1, y.shape[-1])


class ViTEmbeddings(nnx.Module):
    """[CLS] token + patch embeddings + position embeddings, then dropout.

    ``cls_token`` [1, 1, hidden] and ``position_embeddings`` [1, 1 + num_patches, hidden] keep
    the checkpoint's shapes.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        h = cfg.hidden_size
        names = (None, None, "embed")
        self.cls_token = layers.make_param(rngs, init, (1, 1, h), names, cfg.param_dtype)
        self.position_embeddings = layers.make_param(
            rngs, init, (1, cfg.num_patches + 1, h), names, cfg.param_dtype
        )
        self.patch_embeddings = ViTPatchEmbeddings(cfg, rngs=rngs)

    def __call__(self, pixel_values: Array, dropout_rng: Array | None = None) -> Array:
        """[B, H, W, C] -> [B, 1 + num_patches, hidden].

        Raises:
            ValueError: The image is not ``image_size`` square (the position table is fixed).
        """
        cfg = self.config
        b, height, width, c = pixel_values.shape
        if (height, width, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this ViT expects "
                f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (its position "
                "embeddings are for image_size; interpolating them is not supported): resize "
                "the images"
            )
        x = self.patch_embeddings(pixel_values)  # [B, N, hidden]
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)
        return dropout.dropout(x, cfg.hidden_dropout_prob, dropout_rng)


class ViTSelfOutput(nnx.Module):
    """``dense`` + dropout (the residual is added by the layer)."""

    def __init__(self, cfg: ViTConfig, n_in: int, names, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.hidden_dropout_prob
        self.dense = layers.config_dense(cfg, n_in, cfg.hidden_size, names, rngs)

    def __call__(self, h: Array, dropout_rng: Array | None = None) -> Array:
        return dropout.dropout(self.dense(h), self.dropout_rate, dropout_rng)


class ViTAttention(nnx.Module):
    """``attention`` (q/k/v + scaled dot-product attention) then ``output`` (dense)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.attention_probs_dropout_prob
        self.attention = attention.SelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, use_bias=cfg.qkv_bias, out_proj=False,
            kernel_init=nnx.initializers.normal(cfg.initializer_range), dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip
        self.output = ViTSelfOutput(cfg, cfg.hidden_size, ("heads", "embed"), rngs=rngs)

    def __call__(self, x: Array, dropout_rng: Array | None = None) -> Array:
        """[B, T, hidden] -> [B, T, hidden] (before the residual)."""
        rng_probs, rng_out = dropout.split_rng(dropout_rng, 2)
        h = self.attention(x, dropout_rate=self.dropout_rate, dropout_rng=rng_probs)
        return self.output(h, rng_out)


class ViTIntermediate(nnx.Module):
    """Dense [hidden -> intermediate] + activation."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        self.dense = layers.config_dense(
            cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs
        )

    def __call__(self, x: Array) -> Array:
        return layers.get_activation(self.hidden_act)(self.dense(x))


class ViTLayer(nnx.Module):
    """Pre-LayerNorm block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.layernorm_before = _layer_norm(cfg)
        self.attention = ViTAttention(cfg, rngs=rngs)
        self.layernorm_after = _layer_norm(cfg)
        self.intermediate = ViTIntermediate(cfg, rngs=rngs)
        self.output = ViTSelfOutput(cfg, cfg.intermediate_size, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: Array, dropout_rng: Array | None = None) -> Array:
        """[B, T, hidden] -> [B, T, hidden]."""
        rng_attn, rng_out = dropout.split_rng(dropout_rng, 2)
        x = x + self.attention(self.layernorm_before(x), rng_attn)
        return x + self.output(self.intermediate(self.layernorm_after(x)), rng_out)


class ViTEncoder(nnx.Module):
    """The stack of ``ViTLayer``s, in ``layer`` (an ``nnx.List``)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([ViTLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: Array, dropout_rng: Array | None = None) -> Array:
        """[B, T, hidden] -> [B, T, hidden]; layer i gets dropout key fold_in(dropout_rng, i)."""
        return remat.run_encoder(self.layer, x, dropout_rng=dropout_rng)


class ViTModel(nnx.Module):
    """ViT backbone: ``embeddings``, ``encoder``, final ``layernorm`` (no pooler).

    Args:
        config: Model hyperparameters.
        rngs: RNG streams for initialization.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ViTEmbeddings(config, rngs=rngs)
        self.encoder = ViTEncoder(config, rngs=rngs)
        self.layernorm = _layer_norm(config)

    def encode(self, pixel_values: Array, *, dropout_rng: Array | None = None) -> Array:
        """The final-LayerNorm sequence (HF's ``last_hidden_state``):
        [B, image_size, image_size, C] -> [B, 1 + num_patches, hidden]; dropout iff a key."""
        rng_emb, rng_enc = dropout.split_rng(dropout_rng, 2)
        x = self.embeddings(pixel_values, rng_emb)
        return self.layernorm(self.encoder(x, rng_enc))

    def __call__(self, pixel_values: Array, *, dropout_rng: Array | None = None) -> Array:
        """Pooled features: the final-LayerNorm [CLS] token, [B, H, W, C] -> [B, hidden]."""
        rng_emb, rng_enc = dropout.split_rng(dropout_rng, 2)
        x = self.encoder(self.embeddings(pixel_values, rng_emb), rng_enc)
        return self.layernorm(x[:, 0])  # LayerNorm is per token: normalize [CLS] only


class ViTForImageClassification(nnx.Module):
    """ViT backbone (``vit``) + image head (``classifier``) on the [CLS] features.

    Args:
        config: Backbone hyperparameters; ``config.num_labels`` sizes the head when
            ``head.num_labels`` is None (the checkpoint's own head).
        head: Head kind, classes, hidden width and dropout.
        rngs: RNG streams for initialization.
        label_names: Optional class names (kept for export).
    """

    layer_structure = LayerStructure(
        blocks=r"^vit/encoder/layer/(\d+)/", bottom=r"^vit/embeddings/", top=r"^vit/layernorm/"
    )

    def __init__(
        self,
        config: ViTConfig,
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
        self.vit = ViTModel(config, rngs=rngs)
        self.classifier = self.new_classifier(rngs)

    def new_classifier(self, rngs: nnx.Rngs) -> ImageHead:
        """A freshly initialized head as ``head_config`` describes (the loaders build the
        backbone abstractly and fill it from the checkpoint; only a new head needs values)."""
        cfg = self.config
        return ImageHead(
            cfg.hidden_size, self.num_labels, self.head_config, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(
        self, pixel_values: Array, *, train: bool = False, dropout_rng: jax.Array | None = None
    ) -> Array:
        """Classifies images: [B, image_size, image_size, C] float32 -> logits [B, K] float32.

        Args:
            pixel_values: Normalized images, NHWC.
            train: Training mode: with ``dropout_rng``, hidden / attention / head dropout.
            dropout_rng: PRNG key for dropout (used only with ``train``).
        """
        rng_vit, rng_head = dropout.split_rng(dropout_rng if train else None, 2)
        features = self.vit(pixel_values, dropout_rng=rng_vit)  # [B, hidden]
        return self.classifier(features, dropout_rng=rng_head).astype(jnp.float32)
