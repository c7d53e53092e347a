"""Hugging Face <-> sft_jax for the BERT family: the weight table, loaders and the exporter.

Handles both checkpoint layouts: a bare ``BertModel`` (``embeddings.*``, ``encoder.*``,
``pooler.*``, e.g. sentence-transformers' all-MiniLM-L6-v2) and ``BertForSequenceClassification``
(``bert.*`` + ``classifier.*``). Exports always write the latter.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sft_jax.hf import io
from sft_jax.hf.mapping import (
    add_prefix,
    assign_params,
    embedding,
    export_weights,
    flat_params,
    import_weights,
    layer_norm,
    linear,
)
from sft_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel

log = logging.getLogger(__name__)

_LAYER = r"bert.encoder.layer.{i:\d+}"
BERT_RULES = [
    *embedding("bert.embeddings.{e:word_embeddings|position_embeddings|token_type_embeddings}"),
    *layer_norm("bert.embeddings.LayerNorm"),
    *linear(_LAYER + ".attention.self.{p:query|key|value}"),
    *linear(_LAYER + r".{m:attention\.output|intermediate|output}.dense"),
    *layer_norm(_LAYER + r".{m:attention\.output|output}.LayerNorm"),
    *linear("bert.pooler.dense"),
    *linear("classifier"),
]
# HF tensors that are legitimately unused: non-persistent index buffers saved by older
# transformers versions, and the pretraining heads (MLM / next-sentence) of `cls.*`.
BERT_IGNORE = (
    r"bert\.embeddings\.(position_ids|token_type_ids)",
    r"cls\..*",
)
_BASE_ROOTS = ("embeddings", "encoder", "pooler")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def read_bert_config(model_dir: str | Path, **overrides: Any) -> tuple[BertConfig, dict]:
    """Reads ``config.json``; returns (our config, the raw HF dict).

    Raises:
        ValueError: The directory's ``model_type`` is not ``bert``.
    """
    path = Path(model_dir) / "config.json"
    hf = io.read_json(path)
    if hf.get("model_type") != "bert":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, expected 'bert'")
    return BertConfig.from_hf_dict(hf, **overrides), hf


def _dtype_overrides(dtype: Any, param_dtype: Any) -> dict[str, Any]:
    return {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}


def _load_into(
    model: nnx.Module,
    tensors: dict[str, np.ndarray],
    source: Path,
    *,
    our_prefix: str = "",
    allow_missing: Sequence[str] = (),
) -> None:
    """Imports ``tensors`` (``bert.``-prefixed names) into ``model`` in place."""
    params = {our_prefix + p: v for p, v in flat_params(model).items()}
    loaded = import_weights(
        tensors, params, BERT_RULES, source=str(source), ignore=BERT_IGNORE,
        allow_missing=allow_missing,
    )  # fmt: skip
    assign_params(model, {p[len(our_prefix) :]: v for p, v in loaded.items()})


# Older Google BERT checkpoints (e.g. bert-base-uncased) name LayerNorm tensors gamma/beta;
# transformers renames them on load, and so do we. Exports always write weight/bias.
_LEGACY_LAYER_NORM = {
    ".LayerNorm.gamma": ".LayerNorm.weight",
    ".LayerNorm.beta": ".LayerNorm.bias",
}


def rename_legacy_layer_norm(tensors: dict[str, np.ndarray], source: Path) -> dict[str, np.ndarray]:
    """Renames ``*.LayerNorm.gamma``/``*.LayerNorm.beta`` to ``*.LayerNorm.weight``/``.bias``.

    Raises:
        ValueError: A checkpoint holds both spellings of one tensor (both keys are named).
    """
    renamed: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        old = next((o for o in _LEGACY_LAYER_NORM if key.endswith(o)), None)
        new = key if old is None else key[: -len(old)] + _LEGACY_LAYER_NORM[old]
        if old is not None and new in tensors:
            raise ValueError(f"{source} holds both {key!r} and {new!r}: the same tensor twice")
        renamed[new] = value
    return renamed


def _read_tensors(model_dir: str | Path) -> tuple[dict[str, np.ndarray], Path]:
    tensors, source = io.read_model_tensors(model_dir)
    tensors = rename_legacy_layer_norm(tensors, source)
    return add_prefix(tensors, "bert.", _BASE_ROOTS), source


def _pooler_allowance(tensors: dict[str, np.ndarray], source: Path) -> list[str]:
    if "bert.pooler.dense.weight" in tensors:
        return []
    log.warning("%s has no pooler; bert.pooler is randomly initialized", source)
    return [r"bert\.pooler\..*"]


def load_bert_model(
    model_dir: str | Path,
    *,
    seed: int = 0,
    dtype: Any = None,
    param_dtype: Any = None,
) -> BertModel:
    """Loads a Hugging Face BERT directory as a bare ``BertModel`` (with its pooler).

    A classifier head in the checkpoint is an error (load it with ``load_bert_classifier``).

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors``.
        seed: Seeds the pooler when the checkpoint has none.
        dtype: Compute dtype override (default from ``BertConfig``: float32).
        param_dtype: Parameter storage dtype override.
    """
    config, _ = read_bert_config(model_dir, **_dtype_overrides(dtype, param_dtype))
    tensors, source = _read_tensors(model_dir)
    model = BertModel(config, rngs=nnx.Rngs(seed))
    allow = _pooler_allowance(tensors, source)
    _load_into(model, tensors, source, our_prefix="bert.", allow_missing=allow)
    return model


def _label_names(hf: dict, num_labels: int) -> tuple[str, ...] | None:
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) != num_labels:
        return None
    return tuple(str(id2label.get(str(i), id2label.get(i))) for i in range(num_labels))


def load_bert_classifier(
    model_dir: str | Path,
    num_labels: int | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    classifier_dropout: float | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
) -> BertForSequenceClassification:
    """Loads a Hugging Face BERT directory as ``BertForSequenceClassification``.

    A bare encoder checkpoint (``BertModel``) gets a new, randomly initialized ``classifier``;
    a ``BertForSequenceClassification`` checkpoint brings its head and label names along.

    Args:
        model_dir: Directory with ``config.json`` and ``model.safetensors``.
        num_labels: Number of classes; required for a checkpoint without a head, checked
            against the head otherwise.
        rngs: RNG streams for the new head (default ``nnx.Rngs(seed)``).
        seed: Used when ``rngs`` is None.
        classifier_dropout: Dropout before the head (default from the config).
        dtype: Compute dtype override (default float32).
        param_dtype: Parameter storage dtype override.

    Raises:
        ValueError: On a num_labels conflict, or any unused/missing/mis-shaped tensor.
    """
    config, hf = read_bert_config(model_dir, **_dtype_overrides(dtype, param_dtype))
    tensors, source = _read_tensors(model_dir)
    head = tensors.get("classifier.weight")
    if head is None and num_labels is None:
        raise ValueError(f"{source} has no classifier head: pass num_labels")
    if head is not None and num_labels not in (None, head.shape[0]):
        raise ValueError(
            f"{source} has a {head.shape[0]}-way classifier head but num_labels={num_labels}"
        )
    num_labels = int(head.shape[0]) if head is not None else int(num_labels)
    model = BertForSequenceClassification(
        config, num_labels, rngs=rngs or nnx.Rngs(seed), classifier_dropout=classifier_dropout,
        label_names=_label_names(hf, num_labels) if head is not None else None,
    )  # fmt: skip
    allow = _pooler_allowance(tensors, source)
    if head is None:
        log.info("%s has no classifier head; initialized a new %d-way head", source, num_labels)
        allow.append(r"classifier\..*")
    _load_into(model, tensors, source, allow_missing=allow)
    return model


def _hf_config(model: BertForSequenceClassification, labels: Sequence[str]) -> dict[str, Any]:
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names must be unique, got {list(labels)}")
    return {
        **model.config.to_hf_dict(),
        "architectures": ["BertForSequenceClassification"],
        "classifier_dropout": model.classifier_dropout,
        "num_labels": model.num_labels,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "dtype": "float32",
    }


def export_bert_classifier(
    model: BertForSequenceClassification,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Writes a Hugging Face ``BertForSequenceClassification`` directory.

    ``transformers.AutoModelForSequenceClassification.from_pretrained(out_dir)`` loads it, and so
    does ``load_bert_classifier``. Weights are written as float32.

    Args:
        model: The classifier to export.
        out_dir: Destination directory (created).
        label_names: Class names in label order (default: the model's, else ``LABEL_i``).
        tokenizer_dir: Directory to copy the tokenizer files from (those present of
            tokenizer.json, tokenizer_config.json, vocab.txt, special_tokens_map.json).

    Returns:
        ``out_dir`` as a Path.
    """
    labels = label_names or model.label_names or [f"LABEL_{i}" for i in range(model.num_labels)]
    if len(labels) != model.num_labels:
        raise ValueError(f"{len(labels)} label names for a {model.num_labels}-way model")
    out = Path(out_dir)
    params = {p: np.asarray(v[...], dtype=np.float32) for p, v in flat_params(model).items()}
    io.write_safetensors(export_weights(params, BERT_RULES), out / io.SAFETENSORS_NAME)
    io.write_json(_hf_config(model, list(labels)), out / "config.json")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copies the tokenizer files present in ``src_dir``; returns their names.

    Raises:
        FileNotFoundError: ``src_dir`` holds none of ``TOKENIZER_FILES``.
    """
    src, out = Path(src_dir), Path(out_dir)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, out / name)
    return names
