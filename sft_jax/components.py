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


def is_image(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.model.task == "image_classification"


def run_image_spec(cfg: ml_collections.ConfigDict, model_path: Any):
    """The checkpoint's ``ImageSpec`` with the run's resolution (``data.image_size``, 0 = the
    checkpoint's own): what the pipeline feeds the model, and what an export records."""
    import dataclasses

    from sft_jax.pretrained import image_spec

    spec = image_spec(model_path)
    return dataclasses.replace(spec, size=cfg.data.image_size or spec.size)


def load_data(cfg: ml_collections.ConfigDict):
    """``(data, processor)``: ``TextClsData`` and the checkpoint's tokenizer for text
    classification; ``ChatData`` and the chat-template tokenizer for causal LMs;
    ``ImageClsData`` and the checkpoint's ``ImageSpec`` (resolution, normalization) for
    images."""
    if is_image(cfg):
        from sft_jax.data.image_builders import load_image_classification

        data = load_image_classification(cfg.data, data_dir(cfg))
        return data, run_image_spec(cfg, model_dir(cfg))
    if is_lm(cfg):
        from sft_jax.data.chat_sources import load_chat_data
        from sft_jax.data.limits import check_max_length, read_model_limits
        from sft_jax.data.lm import load_chat_tokenizer

        limits = read_model_limits(model_dir(cfg))
        check_max_length(
            cfg.data.max_length, limits.max_positions, "data.max_length", limits.source
        )
        return load_chat_data(cfg.data, data_dir(cfg)), load_chat_tokenizer(model_dir(cfg))
    from sft_jax.data.builders import load_text_classification
    from sft_jax.data.tokenizer import load_tokenizer

    data = load_text_classification(cfg.data, data_dir(cfg))
    return data, load_tokenizer(model_dir(cfg))


def label_names(data: Any) -> list[str]:
    """Class names of a classification dataset; none for language modelling."""
    return list(getattr(data, "label_names", []))


def _check_split(data: Any, split: str, image: bool = False) -> None:
    """Raises naming the config keys that give a missing split (``builders.split_key``)."""
    if split not in data.sources:
        from sft_jax.data.builders import split_key

        kind = "image folders" if image else "files"
        raise ValueError(
            f"split {split!r} is not in the dataset (has {sorted(data.sources)}); for your own "
            f"{kind} set {split_key('validation', image)} / {split_key('test', image)}"
        )


def batches(
    cfg: ml_collections.ConfigDict,
    data: Any,
    processor: Any,
    split: str,
    train: bool,
    process_rows: slice | None = None,
):
    """A grain ``MapDataset`` of batches over one pass of ``split`` (``len`` = batches).

    ``processor`` is ``load_data``'s second value (a tokenizer, or an ``ImageSpec``).
    ``process_rows``: build only these rows of every batch, the ones this process's devices
    hold in a multi-host run (``sharding.process_rows``); None builds whole batches.
    Training: seeded shuffle (the trainer ``repeat()``s it, which reshuffles every epoch), full
    batches, image augmentation. Evaluation: the last batch filled with rows that count for
    nothing, shuffled with a fixed seed so that a partial evaluation
    (``train.max_eval_batches``) sees every class even when the source file is sorted by label
    (the shipped tweet corpus is)."""
    _check_split(data, split, image=is_image(cfg))
    tokenizer = processor
    if is_image(cfg):
        return _image_batches(cfg, data, processor, split, train, process_rows)
    if is_lm(cfg):
        return _lm_batches(cfg, data, tokenizer, split, train, process_rows)
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
        process_rows=process_rows,
    )


def _lm_batches(
    cfg: ml_collections.ConfigDict,
    data: Any,
    tokenizer: Any,
    split: str,
    train: bool,
    process_rows: slice | None,
):
    from sft_jax.data.lm import chat_lm_dataset, chat_lm_rows

    rows = chat_lm_rows(
        data.sources[split],
        tokenizer,
        seq_len=cfg.data.max_length,
        pack=cfg.data.pack,
        # Evaluation too, with a fixed seed (as text and images): a partial evaluation
        # (train.max_eval_batches) then samples the whole split, not its first topics.
        seed=cfg.seed if train else 0,
        shuffle=True,
    )
    return chat_lm_dataset(
        rows,
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        shuffle=train,  # evaluation rows stay in order: the filler rows of the last batch last
        seed=cfg.seed,
        num_epochs=1,
        drop_remainder=train,
        process_rows=process_rows,
    )


def _image_batches(
    cfg: ml_collections.ConfigDict,
    data: Any,
    spec: Any,
    split: str,
    train: bool,
    process_rows: slice | None,
):
    from sft_jax.data.vision import image_cls_dataset

    return image_cls_dataset(
        data.sources[split],
        spec,
        image_size=None,  # spec.size is the run's (run_image_spec)
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        train=train,
        augment=cfg.data.augment,
        seed=cfg.seed if train else 0,
        shuffle=True,
        drop_remainder=train,
        num_epochs=1,
        process_rows=process_rows,
    )


# model.dtype: the compute dtype; parameters and optimizer state stay float32. float16 runs
# with a dynamic loss scale (``sft_jax.loss_scale``).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(cfg: ml_collections.ConfigDict) -> str:
    """``cfg.model.dtype`` (default float32), checked against ``COMPUTE_DTYPES``."""
    dtype = cfg.model.get("dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; use one of {COMPUTE_DTYPES}")
    return dtype


def _model_kwargs(cfg: ml_collections.ConfigDict, num_labels: int) -> dict[str, Any]:
    """The task's ``load_pretrained`` arguments from the ``model`` block."""
    kwargs: dict[str, Any] = {"seed": cfg.seed, "dtype": compute_dtype(cfg)}
    if is_image(cfg):
        kwargs.update(
            num_labels=num_labels,
            head=cfg.model.head,
            head_hidden=cfg.model.head_hidden,
            classifier_dropout=cfg.model.classifier_dropout,
        )
    elif not is_lm(cfg):
        kwargs.update(num_labels=num_labels, classifier_dropout=cfg.model.classifier_dropout)
    return kwargs


def _random_init(model: Any, seed: int) -> Any:
    """The same architecture and head, freshly initialized from ``seed`` (for training from
    scratch): image models are built as ``type(model)(model.config, model.head_config, rngs)``."""
    from flax import nnx

    if not hasattr(model, "head_config"):
        raise ValueError(
            f"model.pretrained=False is supported for image models; {type(model).__name__} "
            "has no random-initialization constructor"
        )
    return type(model)(model.config, model.head_config, rngs=nnx.Rngs(seed))


def build_model(cfg: ml_collections.ConfigDict, num_labels: int = 0, path: str | None = None):
    """The task model from pretrained weights (``path`` overrides ``cfg.model.path``), or
    randomly initialized with ``model.pretrained=False`` (image models), computing in
    ``cfg.model.dtype`` with float32 parameters (mixed precision in bfloat16 or float16), with LoRA
    adapters when ``cfg.lora.rank > 0`` or the freezing policy is ``lora:R``."""
    from sft_jax.pretrained import load_pretrained

    kwargs = _model_kwargs(cfg, num_labels)
    model = load_pretrained(path or cfg.model.path, task=cfg.model.task, **kwargs)
    if not cfg.model.get("pretrained", True):
        model = _random_init(model, cfg.seed)
    from sft_jax.lora import apply_lora_for_policy

    return apply_lora_for_policy(model, cfg.freeze.policy, cfg.get("lora"), cfg.seed)
