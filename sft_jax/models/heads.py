"""Image classification heads on a backbone's pooled features, and the layer structure that
freezing presets read.

Every image model is ``<Family>ForImageClassification`` with the backbone under the family's
name (``resnet``, ``vit``, ``efficientnet``) and the head under ``classifier``; the backbone
returns pooled features ``[B, C]`` (global average pooling for CNNs, the final-norm [CLS] token
for ViT) and the head maps them to logits.

Head kinds (``head=`` of ``load_pretrained``):
  ``"linear"``: dropout -> Dense(num_labels). With ``num_labels=None`` the checkpoint's own
      head is loaded (ImageNet logits); otherwise it is new.
  ``"mlp"``: Dense(hidden, relu) -> dropout -> Dense(num_labels), always new: the founding
      documents' GAP -> Dense(256, relu) -> Dense(num_classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import dropout, layers
from sft_jax.models.layers import Array

HEAD_KINDS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What head to put on a backbone.

    Attributes:
      kind: ``"linear"`` or ``"mlp"``.
      num_labels: Classes; None keeps the checkpoint's own head (``linear`` only).
      hidden: Width of the ``mlp`` head's hidden layer.
      dropout: Dropout rate before the last Dense (training mode only).
    """

    kind: str = "linear"
    num_labels: int | None = None
    hidden: int = 256
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head={self.kind!r}; supported heads: {', '.join(HEAD_KINDS)}")
        if self.kind == "mlp" and self.num_labels is None:
            raise ValueError("head='mlp' is always new: give num_labels")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} must be >= 1")


class ImageHead(nnx.Module):
    """``features [B, C] -> logits [B, num_labels]``; parameters under ``dense`` (and ``hidden``
    for the mlp kind).

    Args:
        in_features: Width of the backbone's pooled features.
        num_labels: Output classes.
        cfg: Kind, hidden width and dropout.
        dtype: Compute dtype.
        param_dtype: Storage dtype.
        rngs: RNG streams for the new kernels.
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        cfg: HeadConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kind = cfg.kind
        self.dropout = float(cfg.dropout)

        def dense(n_in: int, n_out: int, init) -> layers.Dense:
            return layers.Dense(
                n_in, n_out, names=("embed", None), dtype=dtype, param_dtype=param_dtype,
                kernel_init=init, rngs=rngs,
            )  # fmt: skip

        # Kaiming-uniform hidden layer (ReLU follows); small-normal output layer (timm's heads).
        if cfg.kind == "mlp":
            self.hidden = dense(in_features, cfg.hidden, nnx.initializers.he_uniform())
            in_features = cfg.hidden
        self.dense = dense(in_features, num_labels, nnx.initializers.normal(0.01))

    def __call__(self, features: Array, *, dropout_rng: jax.Array | None = None) -> Array:
        x = features
        if self.kind == "mlp":
            x = jax.nn.relu(self.hidden(x))
        x = dropout.dropout(x, self.dropout, dropout_rng)
        return self.dense(x)


@dataclasses.dataclass(frozen=True)
class LayerStructure:
    """A model's parameters in depth order, as path regexes (paths are ``/``-joined).

    Freezing presets that count layers (``train_top:N``, ``freeze_bottom:N``, LLRD, gradual
    unfreezing) are written once against this, so they work for every family.

    Attributes:
      blocks: Regex whose group 1 is a block's index (``^resnet/encoder/stages/(\\d+)/``).
        Blocks are numbered from the input side.
      bottom: Regex of what comes before the first block (stem, embeddings).
      top: Regex of what comes after the last block and before the head (final conv / norm),
        or None when nothing does.
      head: Regex of the task head.
      tied_head: Regex of the token embedding that is also the output layer of a decoder with
        tied weights (no separate head parameter), or None. It stays part of ``bottom`` for the
        depth presets; ``head_only`` trains it as the LM head.
    """

    blocks: str
    bottom: str
    top: str | None = None
    head: str = r"^classifier/"
    tied_head: str | None = None
