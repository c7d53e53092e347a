"""EfficientNet-Lite checkpoints <-> sft_jax: the weight table, the loader, the exporter and the
input specification.

Reads the torch state dicts of the ``efficientnet_lite_pytorch`` port (the shipped ImageNet
``efficientnet-lite{0,1,2}-*.pth`` files, read with ``weights_only=True``) and directories written
by ``export_efficientnet`` (``config.json`` with ``model_type: "efficientnet_lite"`` +
``model.safetensors`` under the same torch names). BatchNorm running statistics travel with the
weights (``running_mean``/``running_var`` <-> our ``mean``/``var`` BatchStats).

Heads: a linear head is torch's ``_fc``. An mlp head (GAP -> Dense(hidden, relu) -> Dense) has no
torch counterpart; it is written as ``_head.hidden.{weight,bias}`` + ``_fc.{weight,bias}`` with
``"head": "mlp"`` in ``config.json``, so such an export loads back here but not into the torch
reference (which has no hidden layer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sft_jax.data.limits import ImageSpec
from sft_jax.hf import image_models, io
from sft_jax.hf.mapping import (
    Rule,
    Transform,
    assign_params,
    export_weights,
    flat_params,
    import_weights,
    linear,
)
from sft_jax.models.conv import hwio_to_torch_conv_weight, torch_conv_weight_to_hwio
from sft_jax.models.efficientnet import (
    VARIANTS,
    EfficientNetForImageClassification,
    EfficientNetLiteConfig,
)
from sft_jax.models.heads import HeadConfig

MODEL_TYPE = "efficientnet_lite"
# torch Conv2d weight [C_out, C_in/g, kh, kw] <-> our HWIO kernel [kh, kw, C_in/g, C_out].
CONV = Transform("conv", torch_conv_weight_to_hwio, hwio_to_torch_conv_weight)
# Model weights and BatchNorm running statistics: both are loaded and exported.
STATE = (nnx.Param, nnx.BatchStat)


def _conv(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}.kernel", CONV)]


def _batch_norm(hf: str, ours: str) -> list[Rule]:
    pairs = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    return [Rule(f"{hf}.{t}", f"{ours}.{o}") for t, o in pairs.items()]


_BLOCK, _OUR_BLOCK = r"_blocks.{i:\d+}", r"efficientnet.blocks.{i:\d+}"
EFFICIENTNET_RULES = [
    *_conv("_conv_stem", "efficientnet.conv_stem"),
    *_batch_norm("_bn0", "efficientnet.bn0"),
    *_conv(_BLOCK + "._{c:expand_conv|depthwise_conv|project_conv}",
           _OUR_BLOCK + ".{c:expand_conv|depthwise_conv|project_conv}"),
    *_batch_norm(_BLOCK + "._{b:bn0|bn1|bn2}", _OUR_BLOCK + ".{b:bn0|bn1|bn2}"),
    *_conv("_conv_head", "efficientnet.conv_head"),
    *_batch_norm("_bn1", "efficientnet.bn1"),
    *linear("_fc", "classifier.dense"),
    *linear("_head.hidden", "classifier.hidden"),  # mlp heads only (see the module docstring)
]  # fmt: skip
# torch's BatchNorm step counters: only used with momentum=None, which these models never use.
IGNORE = (r".*\.num_batches_tracked",)
_HEAD_TENSORS = (r"_fc\..*", r"_head\..*")

# Inference-style normalization, (x - 127) / 128 on 0..255 pixels: TensorFlow's
# models/official/efficientnet/lite/efficientnet_lite_builder.py (tensorflow/tpu), "Edge models
# use inception-style MEAN and STDDEV for better post-quantization": MEAN_RGB = [127.0] * 3,
# STDDEV_RGB = [128.0] * 3. The torch port converted those TF checkpoints (its docstring example
# uses ImageNet mean/std, inherited from the non-lite EfficientNet-PyTorch).
LITE_MEAN_RGB = (127.0 / 255.0,) * 3
LITE_STD_RGB = (128.0 / 255.0,) * 3


def _read(path: Path) -> tuple[dict[str, np.ndarray], Path, dict[str, Any] | None]:
    """(tensors, the file read, config.json or None) for a .pth/.safetensors file or a dir."""
    if path.is_dir():
        config = path / "config.json"
        saved = io.read_json(config) if config.is_file() else None
        if saved is not None and saved.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{config}: model_type is {saved.get('model_type')!r}, expected {MODEL_TYPE!r}"
            )
        tensors, source = io.read_model_tensors(path)
        return tensors, source, saved
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return io.read_safetensors(path), path, None
    return io.read_torch_state_dict(path), path, None


def infer_variant(tensors: dict[str, Any], source: str | Path) -> str:
    """The preset whose number of blocks and last block width match the tensors.

    Raises:
        ValueError: No EfficientNet-Lite0/1/2 has this layout (``source`` is named).
    """
    indices = {int(m.group(1)) for k in tensors if (m := re.match(r"_blocks\.(\d+)\.", k))}
    head = tensors.get("_conv_head.weight")
    if not indices or head is None or np.ndim(head) != 4:
        raise ValueError(
            f"{source} is not an EfficientNet-Lite state dict (expected _conv_stem, _blocks.N.*, "
            f"_conv_head tensors; found {sorted(tensors)[:5]}...)"
        )
    layout = (max(indices) + 1, int(head.shape[1]))
    for name in VARIANTS:
        specs = EfficientNetLiteConfig.from_variant(name).blocks()
        if (len(specs), specs[-1].out_features) == layout:
            return name
    raise ValueError(
        f"{source}: {layout[0]} blocks with {layout[1]} output channels is not "
        f"{', '.join(VARIANTS)}"
    )


def _config(
    tensors: dict[str, Any], source: Path, saved: dict | None, **dtypes: Any
) -> EfficientNetLiteConfig:
    """The config from ``config.json`` when there is one, else inferred from the tensors."""
    if saved is None:
        fc = tensors.get("_fc.weight")
        labels = {} if fc is None else {"num_labels": int(fc.shape[0])}
        variant = infer_variant(tensors, source)
        return EfficientNetLiteConfig.from_variant(variant, **labels, **dtypes)
    try:
        fields = EfficientNetLiteConfig.hf_kwargs(saved)
        return EfficientNetLiteConfig.from_variant(fields.pop("variant", None), **fields, **dtypes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source.parent / 'config.json'}: {e}") from e


def _head_config(
    cfg: EfficientNetLiteConfig, saved: dict | None, num_labels: int | None, head: str,
    hidden: int, dropout: float | None,
) -> HeadConfig:  # fmt: skip
    """A new head when ``num_labels`` is given, else the checkpoint's own (``_fc`` / saved)."""
    if num_labels is not None:
        rate = cfg.dropout_rate if dropout is None else dropout
        return HeadConfig(kind=head, num_labels=num_labels, hidden=hidden, dropout=rate)
    if head != "linear":
        raise ValueError(f"head={head!r} is always new: give num_labels")
    saved = saved or {}
    rate = saved.get("classifier_dropout", cfg.dropout_rate) if dropout is None else dropout
    kind = saved.get("head", "linear")  # an exported mlp head is restored, not new
    return HeadConfig(
        kind=kind, num_labels=cfg.num_labels if kind == "mlp" else None,
        hidden=saved.get("head_hidden", hidden), dropout=float(rate),
    )  # fmt: skip


def _abstract_model(
    cfg: EfficientNetLiteConfig, head: HeadConfig, seed: int, new_head: bool
) -> EfficientNetForImageClassification:
    """The model with shape-only Variables, which the checkpoint then fills (initializing ~300
    tensors eagerly compiles one kernel per shape: seconds on CPU), and a real new head."""
    model = nnx.eval_shape(
        lambda: EfficientNetForImageClassification(cfg, head, rngs=nnx.Rngs(seed))
    )
    if new_head:
        model.classifier = model.new_classifier(nnx.Rngs(seed))
    return model


def load_efficientnet(
    path: str | Path,
    *,
    num_labels: int | None = None,
    head: str = "linear",
    head_hidden: int = 256,
    classifier_dropout: float | None = None,
    seed: int = 0,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
) -> EfficientNetForImageClassification:
    """Loads an EfficientNet-Lite0/1/2 image classifier.

    Args:
        path: A torch state dict (``.pth``, read with ``weights_only=True``), a ``.safetensors``
            file with the same names, or a directory written by ``export_efficientnet``.
        num_labels: None keeps the checkpoint's own head (ImageNet's 1000 classes for the shipped
            weights); a number puts a new head of ``head`` kind on the pretrained backbone and
            ignores the checkpoint's head.
        head: ``"linear"`` or ``"mlp"`` (mlp needs ``num_labels``).
        head_hidden: Hidden width of a new mlp head.
        classifier_dropout: Dropout before the last Dense (default: the variant's, 0.2 / 0.3).
        seed: Seeds the new head.
        dtype: Compute dtype.
        param_dtype: Parameter storage dtype.

    Raises:
        ValueError: An unknown layout or config (the file is named); unused, missing or
            mis-shaped tensors (all listed, with both shapes); ``head="mlp"`` without
            ``num_labels``.
        FileNotFoundError: ``path`` does not exist.
    """
    tensors, source, saved = _read(Path(path))
    cfg = _config(tensors, source, saved, dtype=dtype, param_dtype=param_dtype)
    head_cfg = _head_config(cfg, saved, num_labels, head, head_hidden, classifier_dropout)
    new_head = num_labels is not None
    model = _abstract_model(cfg, head_cfg, seed, new_head)
    loaded = import_weights(
        tensors, flat_params(model, STATE), EFFICIENTNET_RULES, source=str(source),
        ignore=IGNORE + (_HEAD_TENSORS if new_head else ()),
        allow_missing=(r"classifier\..*",) if new_head else (),
    )  # fmt: skip
    assign_params(model, loaded, STATE)
    return model


def read_image_spec(path: str | Path) -> ImageSpec:
    """The input an EfficientNet-Lite checkpoint expects: its variant's resolution (224 / 240 /
    260) and TensorFlow's lite normalization, ``(x - 127) / 128`` on 0..255 pixels (mean 127/255,
    std 128/255 on [0, 1] pixels).

    Args:
        path: As for ``load_efficientnet``.
    """
    tensors, source, saved = _read(Path(path))
    cfg = _config(tensors, source, saved)
    if Path(path).is_dir() and (Path(path) / image_models.PREPROCESSOR_NAME).is_file():
        return image_models.read_image_spec(
            path, default_size=cfg.image_size, default_mean=LITE_MEAN_RGB,
            default_std=LITE_STD_RGB,
        )  # fmt: skip
    return ImageSpec(size=cfg.image_size, mean=LITE_MEAN_RGB, std=LITE_STD_RGB, source=str(source))


def _config_json(model: EfficientNetForImageClassification) -> dict[str, Any]:
    head = model.head_config
    out = {
        **model.config.hf_fields(),
        "model_type": MODEL_TYPE,
        "architectures": ["EfficientNet"],
        "num_labels": model.num_labels,
        "head": head.kind,
        "classifier_dropout": head.dropout,
    }
    if head.kind == "mlp":
        out["head_hidden"] = head.hidden
    return out


def export_efficientnet(
    model: EfficientNetForImageClassification,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    image_spec: ImageSpec | None = None,
) -> Path:
    """Writes ``model.safetensors`` (torch names, float32, running statistics included) and
    ``config.json`` (with ``id2label`` / ``label2id``) to ``out_dir``; with ``image_spec`` (the
    run's input: resolution, normalization) also the ``preprocessor_config.json`` that
    reproduces its evaluation view (``image_models.write_preprocessor_config``), which
    ``read_image_spec`` then reads instead of the variant's native resolution.

    With a linear head the weights load into the torch reference
    (``EfficientNet.from_name(variant, num_classes=K).load_state_dict(..., strict=True)``); the
    ``num_batches_tracked`` counters it expects are written as 0 (we do not count steps; torch
    reads them only with ``momentum=None``). ``load_efficientnet(out_dir)`` restores either head.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    state = {p: np.asarray(v[...], dtype=np.float32) for p, v in flat_params(model, STATE).items()}
    tensors = image_models.add_num_batches_tracked(export_weights(state, EFFICIENTNET_RULES))
    io.write_safetensors(tensors, out / io.SAFETENSORS_NAME)
    config = {**_config_json(model), **image_models.label_maps(label_names, model.num_labels)}
    io.write_json(config, out / "config.json")
    if image_spec is not None:
        image_models.write_preprocessor_config(image_spec, out)
    return out
