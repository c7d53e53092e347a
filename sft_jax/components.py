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


def load_data(cfg: ml_collections.ConfigDict):
    """``(TextClsData, tokenizer)`` for a text classification config."""
    from sft_jax.data.builders import load_text_classification
    from sft_jax.data.text import load_tokenizer

    data = load_text_classification(cfg.data, data_dir(cfg))
    return data, load_tokenizer(model_dir(cfg))


def batches(cfg: ml_collections.ConfigDict, data: Any, tokenizer: Any, split: str, train: bool):
    """A grain ``MapDataset`` of batches. Training: seeded shuffle, repeated, full batches;
    evaluation: one pass, the last batch padded (``example_mask`` 0), shuffled with a fixed seed
    so that a partial evaluation (``train.max_eval_batches``) sees every class even when the
    source file is sorted by label (the shipped tweet corpus is)."""
    from sft_jax.data.text import text_cls_dataset

    if split not in data.sources:
        raise ValueError(
            f"split {split!r} is not in the dataset (has {sorted(data.sources)}); "
            "for your own files set data.validation_file / data.test_file"
        )
    return text_cls_dataset(
        data.sources[split],
        tokenizer,
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        buckets=tuple(cfg.data.buckets),
        max_length=cfg.data.max_length,
        shuffle=True,
        seed=cfg.seed if train else 0,
        num_epochs=None if train else 1,
        drop_remainder=train,
        text_pair=data.text_pair,
    )


def build_model(cfg: ml_collections.ConfigDict, num_labels: int, path: str | None = None):
    """The task model from pretrained weights (``path`` overrides ``cfg.model.path``)."""
    from sft_jax.pretrained import load_pretrained

    return load_pretrained(
        path or cfg.model.path,
        task=cfg.model.task,
        num_labels=num_labels,
        classifier_dropout=cfg.model.classifier_dropout,
        seed=cfg.seed,
    )
