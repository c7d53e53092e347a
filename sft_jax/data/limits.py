"""Checks that a tokenizer and the data fit the model they are fed to.

A token id at or past the model's embedding rows, or a position past its position table, is not
an error on an accelerator: the gather clamps it and training goes on with the wrong rows. These
checks turn both into errors that name the sizes and the files they come from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What a checkpoint's configuration says about its inputs.

    Attributes:
      vocab_size: embedding rows (token ids must be below it); None when unknown.
      max_positions: longest sequence the position table covers; None when unknown.
      source: the file these come from (named in errors).
    """

    vocab_size: int | None
    max_positions: int | None
    source: str


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """The input an image checkpoint was trained on: what the vision pipeline must produce.

    Attributes:
      size: Square input resolution in pixels (height = width).
      mean: Per-channel (RGB) mean subtracted from pixels scaled to [0, 1].
      std: Per-channel (RGB) standard deviation the centred pixels are divided by.
      source: The file (or package) these come from (named in errors and logs).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_model_limits(model_path: str | Path) -> ModelLimits:
    """Reads the vocabulary size and maximum positions of a checkpoint.

    Args:
      model_path: a Hugging Face directory (its `config.json`: `vocab_size` and
        `max_position_embeddings`, or GPT-2's `n_positions`) or a `.gguf` file (its metadata).

    Returns:
      The limits; fields are None when the configuration does not say (or has no file).

    Raises:
      ValueError: the configuration file exists but cannot be read (the file is named).
    """
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        from sft_jax.hf.gguf import read_gguf_metadata

        meta = read_gguf_metadata(path)
        arch = meta.get("general.architecture")
        return ModelLimits(
            vocab_size=_int_or_none(meta.get("tokenizer.ggml.tokens")),
            max_positions=_int_or_none(meta.get(f"{arch}.context_length")),
            source=str(path),
        )
    config = path / "config.json"
    if not config.is_file():
        return ModelLimits(None, None, str(config))
    from sft_jax.hf.io import read_json

    hf = read_json(config)
    positions = hf.get("max_position_embeddings", hf.get("n_positions"))
    return ModelLimits(_int_or_none(hf.get("vocab_size")), _int_or_none(positions), str(config))


def tokenizer_id_limit(tokenizer: Any) -> int:
    """One past the largest id a tokenizer can emit (added and special tokens included).

    Args:
      tokenizer: a `sft_jax.data.tokenizer.TextTokenizer`, a `tokenizers.Tokenizer` or a
        transformers tokenizer.
    """
    backend = getattr(tokenizer, "backend", tokenizer)
    if hasattr(backend, "get_vocab_size"):  # tokenizers.Tokenizer
        vocab = backend.get_vocab(with_added_tokens=True)
    else:  # transformers: get_vocab() includes the added tokens
        vocab = tokenizer.get_vocab()
    return max(vocab.values(), default=-1) + 1


def check_tokenizer_fits(tokenizer_vocab_size: int, model_vocab_size: int, where: str) -> None:
    """Raises unless every id the tokenizer can emit has a row in the model's embedding.

    Args:
      tokenizer_vocab_size: one past the tokenizer's largest id (`tokenizer_id_limit`).
      model_vocab_size: the model's embedding rows (its `vocab_size`).
      where: what is being checked, e.g. "tokenizer.json vs config.json" (starts the message).

    Raises:
      ValueError: the tokenizer can emit ids >= `model_vocab_size`; names both sizes.
    """
    if tokenizer_vocab_size > model_vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer_vocab_size} token ids (up to "
            f"{tokenizer_vocab_size - 1}) but the model's embedding has only {model_vocab_size} "
            "rows (vocab_size); use the tokenizer saved with this model, or resize the model's "
            "embeddings to the tokenizer"
        )


def check_max_length(
    max_length: int, max_positions: int | None, where: str, source: str = "its config"
) -> None:
    """Raises when sequences of `max_length` tokens would run past the model's positions.

    Args:
      max_length: the longest sequence the data pipeline produces (`data.max_length`).
      max_positions: the model's position table size; None (unknown) passes.
      where: the config key at fault, e.g. "data.max_length" (starts the message).
      source: where `max_positions` comes from (`ModelLimits.source`).

    Raises:
      ValueError: `max_length > max_positions`; names both numbers.
    """
    if max_positions is not None and max_length > max_positions:
        raise ValueError(
            f"{where}={max_length} is longer than the model's maximum of {max_positions} "
            f"positions ({source}); set it to at most {max_positions}"
        )
