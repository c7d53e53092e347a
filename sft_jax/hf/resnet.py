"""Hugging Face <-> sft_jax for ResNet: the weight table, loader, exporter and input spec.

Handles both checkpoint layouts: a bare ``ResNetModel`` (``embedder.*``, ``encoder.*``) and
``ResNetForImageClassification`` (``resnet.*`` + ``classifier.1.*``, e.g. microsoft/resnet-50).
Exports always write the latter. BatchNorm running statistics travel with the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sft_jax.data.limits import ImageSpec
from sft_jax.hf import image_models
from sft_jax.hf.image_models import batch_norm, conv2d
from sft_jax.hf.mapping import linear
from sft_jax.models.resnet import ResNetConfig, ResNetForImageClassification


def _conv_layer(name: str) -> list:
    """A ResNetConvLayer / ResNetShortCut: ``convolution`` (no bias) + ``normalization``."""
    return [*conv2d(f"{name}.convolution"), *batch_norm(f"{name}.normalization")]


_LAYER = r"resnet.encoder.stages.{s:\d+}.layers.{l:\d+}"
RESNET_RULES = [
    *_conv_layer("resnet.embedder.embedder"),
    *_conv_layer(_LAYER + r".layer.{k:\d+}"),
    *_conv_layer(_LAYER + ".shortcut"),
    *linear("classifier.1", "classifier.dense"),  # HF: Sequential(Flatten, Linear)
]
RESNET = image_models.Family(
    model_type="resnet",
    prefix="resnet.",
    base_roots=("embedder", "encoder"),
    head_weight="classifier.1.weight",
    config_cls=ResNetConfig,
    model_cls=ResNetForImageClassification,
    rules=tuple(RESNET_RULES),
)


def read_resnet_config(model_dir: str | Path, **overrides: Any) -> tuple[ResNetConfig, dict]:
    """Reads ``config.json``; returns (our config, the raw HF dict).

    Raises:
        ValueError: The directory's ``model_type`` is not ``resnet``.
    """
    hf, _ = image_models.read_config(model_dir, "resnet")
    return ResNetConfig.from_hf_dict(hf, **overrides), hf


def load_resnet(
    model_dir: str | Path,
    *,
    num_labels: int | None = None,
    head: str = "linear",
    head_hidden: int = 256,
    classifier_dropout: float = 0.0,
    seed: int = 0,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
) -> ResNetForImageClassification:
    """Loads a Hugging Face ResNet directory as ``ResNetForImageClassification``.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors`` (or
            ``pytorch_model.bin``), either layout.
        num_labels: None keeps the checkpoint's classifier (and its ``id2label`` names);
            an int puts a new ``head`` of that many classes on the backbone (the checkpoint's
            classifier, if any, is ignored).
        head: ``"linear"`` or ``"mlp"`` (GAP -> Dense(head_hidden, relu) -> Dense); see
            ``sft_jax.models.heads``.
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
        RESNET, model_dir, num_labels=num_labels, head=head, head_hidden=head_hidden,
        classifier_dropout=classifier_dropout, seed=seed, dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip


def export_resnet(
    model: ResNetForImageClassification,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    image_spec: ImageSpec | None = None,
) -> Path:
    """Writes a Hugging Face ``ResNetForImageClassification`` directory.

    ``transformers.AutoModelForImageClassification.from_pretrained(out_dir)`` loads it with no
    missing or unexpected keys and gives the same logits; so does ``load_resnet``. Weights and
    running statistics are written as float32 (``num_batches_tracked`` as 0).

    Args:
        model: The classifier to export (a linear head).
        out_dir: Destination directory (created).
        label_names: Class names in label order (default: the model's, else ``LABEL_i``).
        image_spec: When given, also writes ``preprocessor_config.json`` for it.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: An mlp head (HF's ResNet classifier is a single Linear), or label names
            that do not fit.
    """
    return image_models.export_image_classifier(
        model, out_dir, RESNET_RULES, architecture="ResNetForImageClassification",
        labels=label_names, image_spec=image_spec,
        fix_tensors=image_models.add_num_batches_tracked,
    )  # fmt: skip


def read_image_spec(model_dir: str | Path) -> ImageSpec:
    """The checkpoint's input resolution and normalization, from ``preprocessor_config.json``
    (microsoft/resnet-50: 224, ImageNet mean/std); without it, 224 and ImageNet mean/std."""
    return image_models.read_image_spec(
        model_dir, default_size=224, default_mean=image_models.IMAGENET_MEAN,
        default_std=image_models.IMAGENET_STD,
    )  # fmt: skip
