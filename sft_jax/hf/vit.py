"""Hugging Face <-> sft_jax for ViT: the weight table, loader, exporter and input spec.

Handles both checkpoint layouts: a bare ``ViTModel`` (``embeddings.*``, ``encoder.*``,
``layernorm.*``, ``pooler.*``, e.g. google/vit-base-patch16-224-in21k) and
``ViTForImageClassification`` (``vit.*`` + ``classifier.*``, e.g. google/vit-base-patch16-224).
The pooler is not used by the image classifier and is ignored. Names are the checkpoint layout
(``encoder.layer.{i}.attention.attention.query``), which transformers 5 still writes and reads.
Exports always write ``ViTForImageClassification``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sft_jax.data.limits import ImageSpec
from sft_jax.hf import image_models
from sft_jax.hf.image_models import conv2d
from sft_jax.hf.mapping import Rule, layer_norm, linear
from sft_jax.models.vit import ViTConfig, ViTForImageClassification

_EMBED = "vit.embeddings.{p:cls_token|position_embeddings}"
_LAYER = r"vit.encoder.layer.{i:\d+}"
VIT_RULES = [
    Rule(_EMBED, _EMBED),  # same shapes ([1, 1, H], [1, 1 + N, H]) on both sides
    *conv2d("vit.embeddings.patch_embeddings.projection", bias=True),
    *linear(_LAYER + ".attention.attention.{p:query|key|value}"),
    *linear(_LAYER + r".{m:attention\.output|intermediate|output}.dense"),
    *layer_norm(_LAYER + ".{n:layernorm_before|layernorm_after}"),
    *layer_norm("vit.layernorm"),
    *linear("classifier", "classifier.dense"),
]
VIT = image_models.Family(
    model_type="vit",
    prefix="vit.",
    base_roots=("embeddings", "encoder", "layernorm", "pooler"),
    head_weight="classifier.weight",
    config_cls=ViTConfig,
    model_cls=ViTForImageClassification,
    rules=tuple(VIT_RULES),
    ignore=(r"vit\.pooler\..*",),  # ViTModel's tanh pooler: the image classifier skips it
)


def read_vit_config(model_dir: str | Path, **overrides: Any) -> tuple[ViTConfig, dict]:
    """Reads ``config.json``; returns (our config, the raw HF dict).

    Raises:
        ValueError: The directory's ``model_type`` is not ``vit``.
    """
    hf, _ = image_models.read_config(model_dir, "vit")
    return ViTConfig.from_hf_dict(hf, **overrides), hf


def load_vit(
    model_dir: str | Path,
    *,
    num_labels: int | None = None,
    head: str = "linear",
    head_hidden: int = 256,
    classifier_dropout: float = 0.0,
    seed: int = 0,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
) -> ViTForImageClassification:
    """Loads a Hugging Face ViT directory as ``ViTForImageClassification``.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors`` (or
            ``pytorch_model.bin``), either layout.
        num_labels: None keeps the checkpoint's classifier (and its ``id2label`` names);
            an int puts a new ``head`` of that many classes on the backbone (the checkpoint's
            classifier, if any, is ignored).
        head: ``"linear"`` or ``"mlp"`` (Dense(head_hidden, relu) -> Dense on the [CLS]
            features); see ``sft_jax.models.heads``.
        head_hidden: Hidden width of the mlp head.
        classifier_dropout: Dropout before the head's last Dense (training mode only).
        seed: Seeds the new head.
        dtype: Compute dtype.
        param_dtype: Parameter storage dtype.

    Raises:
        ValueError: ``num_labels=None`` on a checkpoint without a classifier, or any unused,
            missing or mis-shaped tensor (all named, with the file).
    """
    return image_models.load_image_classifier(
        VIT, model_dir, num_labels=num_labels, head=head, head_hidden=head_hidden,
        classifier_dropout=classifier_dropout, seed=seed, dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip


def export_vit(
    model: ViTForImageClassification,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    image_spec: ImageSpec | None = None,
) -> Path:
    """Writes a Hugging Face ``ViTForImageClassification`` directory.

    ``transformers.AutoModelForImageClassification.from_pretrained(out_dir)`` loads it with no
    missing or unexpected keys and gives the same logits; so does ``load_vit``. Weights are
    written as float32.

    Args:
        model: The classifier to export (a linear head).
        out_dir: Destination directory (created).
        label_names: Class names in label order (default: the model's, else ``LABEL_i``).
        image_spec: When given, also writes ``preprocessor_config.json`` for it.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: An mlp head (HF's ViT classifier is a single Linear), or label names that
            do not fit.
    """
    return image_models.export_image_classifier(
        model, out_dir, VIT_RULES, architecture="ViTForImageClassification",
        labels=label_names, image_spec=image_spec,
    )  # fmt: skip


def read_image_spec(model_dir: str | Path) -> ImageSpec:
    """The checkpoint's input resolution and normalization, from ``preprocessor_config.json``
    (google/vit-base-patch16-224: 224, mean = std = 0.5); without it, ``config.json``'s
    ``image_size`` and 0.5 / 0.5."""
    config, _ = read_vit_config(model_dir)
    half = (0.5, 0.5, 0.5)
    return image_models.read_image_spec(
        model_dir, default_size=config.image_size, default_mean=half, default_std=half
    )
