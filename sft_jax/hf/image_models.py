"""What the image families' Hugging Face loaders and exporters share (``sft_jax.hf.resnet``,
``sft_jax.hf.vit``): conv / BatchNorm table rows, the choice between the checkpoint's head and a
new one, strict loading of parameters *and* BatchNorm running statistics, the exporter, and the
preprocessing spec (``preprocessor_config.json`` <-> ``ImageSpec``).

BatchNorm running statistics are ``nnx.BatchStat`` variables: they are read and written with the
weights (``WEIGHTS``). torch's ``num_batches_tracked`` counter has no counterpart here (momentum
is fixed); it is ignored on import and written as 0 on export so the state dict is complete.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sft_jax.data.limits import ImageSpec
from sft_jax.hf import io
from sft_jax.hf.mapping import (
    Rule,
    Transform,
    add_prefix,
    assign_params,
    export_weights,
    flat_params,
    import_weights,
)
from sft_jax.models.conv import hwio_to_torch_conv_weight, torch_conv_weight_to_hwio
from sft_jax.models.heads import HeadConfig

log = logging.getLogger(__name__)

# What an image checkpoint holds: parameters and BatchNorm running statistics.
WEIGHTS = (nnx.Param, nnx.BatchStat)
# torch Conv2d weight [C_out, C_in/g, kh, kw] <-> our HWIO kernel.
CONV = Transform("conv", torch_conv_weight_to_hwio, hwio_to_torch_conv_weight)
NUM_BATCHES_TRACKED = r".*\.num_batches_tracked"
PREPROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv2d(name: str, ours: str | None = None, *, bias: bool = False) -> list[Rule]:
    """Rules for a torch ``nn.Conv2d`` (weight[, bias]) <-> our ``Conv2d`` (kernel[, bias])."""
    ours = name if ours is None else ours
    rules = [Rule(f"{name}.weight", f"{ours}.kernel", CONV)]
    return rules + [Rule(f"{name}.bias", f"{ours}.bias")] if bias else rules


def batch_norm(name: str, ours: str | None = None) -> list[Rule]:
    """Rules for a torch ``nn.BatchNorm2d`` <-> our ``BatchNorm`` (scale, bias, mean, var);
    ``num_batches_tracked`` is handled by ``NUM_BATCHES_TRACKED`` / ``add_num_batches_tracked``."""
    ours = name if ours is None else ours
    pairs = (
        ("weight", "scale"),
        ("bias", "bias"),
        ("running_mean", "mean"),
        ("running_var", "var"),
    )
    return [Rule(f"{name}.{hf}", f"{ours}.{our}") for hf, our in pairs]


def add_num_batches_tracked(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds a 0 ``num_batches_tracked`` (int64 scalar, as torch) next to every running mean."""
    suffix = ".running_mean"
    extra = {
        k[: -len(suffix)] + ".num_batches_tracked": np.zeros((), np.int64)
        for k in tensors
        if k.endswith(suffix)
    }
    return {**tensors, **extra}


def read_config(model_dir: str | Path, model_type: str) -> tuple[dict[str, Any], Path]:
    """Reads ``config.json``; returns (the dict, its path).

    Raises:
        ValueError: Its ``model_type`` is not ``model_type``.
    """
    path = Path(model_dir) / "config.json"
    hf = io.read_json(path)
    if hf.get("model_type") != model_type:
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, expected {model_type!r}")
    return hf, path


@dataclasses.dataclass(frozen=True)
class Family:
    """How one image family's checkpoints look.

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      prefix: Our backbone attribute and the task checkpoints' prefix (``"resnet."``).
      base_roots: First name segments of a bare backbone checkpoint (prefixed on load).
      head_weight: The classifier weight's name in a task checkpoint.
      config_cls: The config dataclass (``from_hf_dict``).
      model_cls: ``model_cls(config, head, *, rngs, label_names)``, with
        ``new_classifier(rngs)``.
      rules: The weight table.
      ignore: Regexes of checkpoint tensors that are legitimately unused.
    """

    model_type: str
    prefix: str
    base_roots: tuple[str, ...]
    head_weight: str
    config_cls: Any
    model_cls: Any
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()


def _head_config(
    family: Family,
    checkpoint_head: np.ndarray | None,
    num_labels: int | None,
    head: str,
    head_hidden: int,
    classifier_dropout: float,
    *,
    source: Path,
    config_path: Path,
    hf: Mapping[str, Any],
) -> HeadConfig:
    """The head to build: the checkpoint's own (``num_labels=None``) or a new one."""
    if num_labels is None and head == "linear" and checkpoint_head is None:
        raise ValueError(
            f"{source} has no classifier ({family.head_weight}; a bare backbone: "
            f"{config_path} says architectures={hf.get('architectures')}): pass num_labels to "
            "put a new head on it"
        )
    return HeadConfig(head, num_labels, head_hidden, classifier_dropout)


def label_names(hf: Mapping[str, Any], num_labels: int) -> tuple[str, ...] | None:
    """``id2label`` as a tuple in label order, or None when it does not have ``num_labels``."""
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) != num_labels:
        return None
    return tuple(str(id2label.get(str(i), id2label.get(i))) for i in range(num_labels))


def load_image_classifier(
    family: Family,
    model_dir: str | Path,
    *,
    num_labels: int | None,
    head: str,
    head_hidden: int,
    classifier_dropout: float,
    seed: int,
    dtype: Any,
    param_dtype: Any,
) -> nnx.Module:
    """Loads either checkpoint layout of ``family`` strictly (parameters and BatchNorm running
    statistics); see ``sft_jax.hf.resnet.load_resnet`` for the arguments."""
    hf, config_path = read_config(model_dir, family.model_type)
    tensors, source = io.read_model_tensors(model_dir)
    tensors = add_prefix(tensors, family.prefix, family.base_roots)
    ckpt_head = tensors.get(family.head_weight)
    head_cfg = _head_config(
        family, ckpt_head, num_labels, head, head_hidden, classifier_dropout, source=source,
        config_path=config_path, hf=hf,
    )  # fmt: skip
    overrides: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype)
    if num_labels is None:  # the checkpoint's head decides the classes
        overrides["num_labels"] = int(ckpt_head.shape[0])
    config = family.config_cls.from_hf_dict(hf, **overrides)
    names = label_names(hf, config.num_labels) if num_labels is None else None
    # Shape-only Variables that the checkpoint fills (initializing every tensor eagerly compiles
    # one kernel per shape: ~10 s for ResNet-50 on 2 CPU cores), and a real new head.
    model = nnx.eval_shape(
        lambda: family.model_cls(config, head_cfg, rngs=nnx.Rngs(seed), label_names=names)
    )
    new_head = num_labels is not None
    if new_head:
        model.classifier = model.new_classifier(nnx.Rngs(seed))
    ignore = [*family.ignore, NUM_BATCHES_TRACKED] + ([r"classifier\..*"] if new_head else [])
    loaded = import_weights(
        tensors, flat_params(model, WEIGHTS), family.rules, source=str(source), ignore=ignore,
        allow_missing=[r"classifier\..*"] if new_head else [],
    )  # fmt: skip
    assign_params(model, loaded, WEIGHTS)
    if new_head:
        log.info("%s: initialized a new %d-way %s head", source, num_labels, head)
    return model


def export_image_classifier(
    model: nnx.Module,
    out_dir: str | Path,
    rules: Sequence[Rule],
    *,
    architecture: str,
    labels: Sequence[str] | None,
    image_spec: ImageSpec | None,
    fix_tensors: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda t: t,
) -> Path:
    """Writes ``config.json`` (``architecture``, ``id2label``) and float32 ``model.safetensors``
    (and ``preprocessor_config.json`` from ``image_spec``); see ``export_resnet``."""
    if model.classifier.kind != "linear":
        raise ValueError(
            f"cannot export a {model.classifier.kind!r} head: Hugging Face's {architecture} "
            "has a single Linear classifier; export a model with head='linear' (or export the "
            "backbone's features yourself)"
        )
    maps = label_maps(labels or model.label_names, model.num_labels)
    out = Path(out_dir)
    arrays = {p: np.asarray(v[...], np.float32) for p, v in flat_params(model, WEIGHTS).items()}
    tensors = fix_tensors(export_weights(arrays, rules))
    io.write_safetensors(tensors, out / io.SAFETENSORS_NAME)
    config = {
        **model.config.to_hf_dict(),
        "architectures": [architecture],
        **maps,
        "dtype": "float32",
    }
    io.write_json(config, out / "config.json")
    if image_spec is not None:
        write_preprocessor_config(image_spec, out)
    return out


def label_maps(labels: Sequence[str] | None, num_labels: int) -> dict[str, dict]:
    """``config.json``'s ``id2label`` / ``label2id`` (``LABEL_i`` without names).

    Raises:
        ValueError: Not ``num_labels`` names, or repeated names.
    """
    labels = list(labels or [f"LABEL_{i}" for i in range(num_labels)])
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} label names for a {num_labels}-way model")
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names must be unique, got {labels}")
    return {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def _edge(value: Any, key: str, path: Path) -> int:
    """An image size entry: an int, {"height", "width"} (square) or {"shortest_edge"}."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise ValueError(
                f"{path}: {key}={value} is not square; only square inputs are supported"
            )
        return int(value["height"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(
        f"{path}: cannot read {key}={value!r}; expected an int, {{'height', 'width'}} or "
        "{'shortest_edge'}"
    )


def _triple(value: Any, key: str, path: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{path}: {key}={value!r}; expected 3 per-channel (RGB) values")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def read_image_spec(
    model_dir: str | Path,
    *,
    default_size: int,
    default_mean: tuple[float, float, float],
    default_std: tuple[float, float, float],
) -> ImageSpec:
    """The input a checkpoint expects, from its ``preprocessor_config.json``: ``crop_size``
    (when center cropping) else ``size``; ``image_mean`` / ``image_std``. Without that file (or
    those keys), the family's defaults."""
    path = Path(model_dir) / PREPROCESSOR_NAME
    if not path.is_file():
        return ImageSpec(default_size, default_mean, default_std, f"{path} (absent: defaults)")
    d = io.read_json(path)
    if "crop_size" in d and d.get("do_center_crop", True):
        size = _edge(d["crop_size"], "crop_size", path)
    elif "size" in d:
        size = _edge(d["size"], "size", path)
    else:
        size = default_size
    mean = _triple(d["image_mean"], "image_mean", path) if "image_mean" in d else default_mean
    std = _triple(d["image_std"], "image_std", path) if "image_std" in d else default_std
    return ImageSpec(size, mean, std, str(path))


def write_preprocessor_config(spec: ImageSpec, out_dir: str | Path) -> Path:
    """Writes a ``preprocessor_config.json`` for ``spec`` that reproduces our evaluation view
    (``sft_jax.data.vision``: the centred square of side min(H, W), resized to ``size``) with a
    stock processor, ``CLIPImageProcessor``: RGB, the shortest edge resized to ``size`` (PIL
    bilinear, the filter ``warp.warp`` implements), the centred ``size`` x ``size`` crop, scaled
    to [0, 1], normalized by ``mean`` / ``std``.

    With transformers' PIL backend (``backend="pil"``, the default without torchvision; the
    torchvision backend is untested here) its ``pixel_values`` equal our evaluation batches up
    to PIL's 8-bit rounding after each of its two resampling passes (at most 1/255/std, and
    reached: tests/data/test_resize.py) whenever the resized long edge
    ``L = size * long / short`` is an integer and ``L - size`` is even, square images included.
    Otherwise transformers truncates ``L`` to an integer (the long axis shrinks up to ``1 / L``
    more than the short one) and rounds the crop offset ``(L - size) / 2`` down, so its samples
    along the long axis sit up to one output pixel from ours (0.25 pixel for 480x640 -> 224).
    Measured worst cases (normalized units, ImageNet std) over 8 image shapes x 7 sizes: 1.10
    on a smooth pattern (50x75 -> 11), 2.45 on uniform noise (37x53 -> 32).
    """
    path = Path(out_dir) / PREPROCESSOR_NAME
    io.write_json(
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": spec.size},
            "resample": 2,  # PIL bilinear
            "do_center_crop": True,
            "crop_size": {"height": spec.size, "width": spec.size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(spec.mean),
            "image_std": list(spec.std),
        },
        path,
    )
    return path
