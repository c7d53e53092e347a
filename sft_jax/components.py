"""Config -> the pieces a run is made of (data pipelines, tokenizer, model).

Shared by training, evaluation and export so that all three see the same data splits and the
same model construction. Nothing here trains.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections


def data_dir(cfg: ml_collections.ConfigDict) -> str:
    """The tfds ``data_dir``: config, else ``$SFT_JAX_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return (
        cfg.data.data_dir
        or os.environ.get("SFT_JAX_DATA_DIR")
        or os.path.expanduser("~/tensorflow_datasets")
    )


def model_dir(cfg: ml_collections.ConfigDict) -> Path:
    from sft_jax.pretrained import resolve_model_dir

    return resolve_model_dir(cfg.model.path)


def is_lm(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.model.task == "causal_lm"


def load_data(cfg: ml_collections.ConfigDict):
    """``(data, tokenizer)``: ``TextClsData`` and the checkpoint's tokenizer for
    classification; ``ChatData`` and the chat-template tokenizer for causal LMs."""
    if is_lm(cfg):
        from sft_jax.data.chat_builders import load_chat_data
        from sft_jax.data.limits import check_max_length, read_model_limits
        from sft_jax.data.lm import load_chat_tokenizer

        limits = read_model_limits(model_dir(cfg))
        check_max_length(
            cfg.data.max_length, limits.max_positions, "data.max_length", limits.source
        )
        return load_chat_data(cfg.data, data_dir(cfg)), load_chat_tokenizer(model_dir(cfg))
    from sft_jax.data.builders import load_text_classification
    from sft_jax.data.text import load_tokenizer

    data = load_text_classification(cfg.data, data_dir(cfg))
    return data, load_tokenizer(model_dir(cfg))


def label_names(data: Any) -> list[str]:
    """Class names of a classification dataset; none for language modelling."""
    return list(getattr(data, "label_names", []))


def _check_split(data: Any, split: str) -> None:
    if split not in data.sources:
        raise ValueError(
            f"split {split!r} is not in the dataset (has {sorted(data.sources)}); "
            "for your own files set data.validation_file / data.test_file"
        )


def batches(cfg: ml_collections.ConfigDict, data: Any, tokenizer: Any, split: str, train: bool):
    """A grain ``MapDataset`` of batches over one pass of ``split`` (``len`` = batches).

    Training: seeded shuffle (the trainer ``repeat()``s it, which reshuffles every epoch), full
    batches. Evaluation: the last batch filled with rows that count for nothing, shuffled with a
    fixed seed so that a partial evaluation (``train.max_eval_batches``) sees every class even
    when the source file is sorted by label (the shipped tweet corpus is)."""
    _check_split(data, split)
    if is_lm(cfg):
        return _lm_batches(cfg, data, tokenizer, split, train)
    from sft_jax.data.text import text_cls_dataset

    return text_cls_dataset(
        data.sources[split],
        tokenizer,
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        buckets=tuple(cfg.data.buckets),
        max_length=cfg.data.max_length,
        shuffle=True,
        seed=cfg.seed if train else 0,
        num_epochs=1,
        drop_remainder=train,
        text_pair=data.text_pair,
        truncate=cfg.data.get("truncate", True),
        split=split,
    )


def _lm_batches(cfg: ml_collections.ConfigDict, data: Any, tokenizer: Any, split: str, train: bool):
    from sft_jax.data.lm import chat_lm_dataset, chat_lm_rows

    rows = chat_lm_rows(
        data.sources[split],
        tokenizer,
        seq_len=cfg.data.max_length,
        pack=cfg.data.pack,
        seed=cfg.seed,
        shuffle=train,
    )
    return chat_lm_dataset(
        rows,
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        shuffle=train,
        seed=cfg.seed,
        num_epochs=1,
        drop_remainder=train,
    )


def build_model(cfg: ml_collections.ConfigDict, num_labels: int = 0, path: str | None = None):
    """The task model from pretrained weights (``path`` overrides ``cfg.model.path``), computing
    in ``cfg.model.dtype`` with float32 parameters (mixed precision when bfloat16), with LoRA
    adapters when ``cfg.lora.rank > 0``."""
    from sft_jax.pretrained import load_pretrained

    kwargs: dict[str, Any] = {"seed": cfg.seed, "dtype": cfg.model.get("dtype", "float32")}
    if not is_lm(cfg):
        kwargs.update(num_labels=num_labels, classifier_dropout=cfg.model.classifier_dropout)
    model = load_pretrained(path or cfg.model.path, task=cfg.model.task, **kwargs)
    if "lora" in cfg:
        from sft_jax.lora import apply_lora_from_config

        model = apply_lora_from_config(model, cfg.lora)
    return model
