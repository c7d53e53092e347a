"""A checkpoint's fast tokenizer (`tokenizer.json`), loaded without transformers.

`load_tokenizer` reads a local Hugging Face checkpoint directory (`tokenizer.json`, and
`tokenizer_config.json` and the model's `config.json` when present) into a `TextTokenizer`,
which encodes a text, or a pair of texts, with special tokens into an `Encoded` example,
truncated to a given length when asked. `sft_jax.data.text` batches its encodings.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import tokenizers

from sft_jax.data.limits import check_tokenizer_fits, read_model_limits, tokenizer_id_limit


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized example: ids and segment ids with special tokens, and whether it was cut."""

    input_ids: list[int]
    token_type_ids: list[int]
    truncated: bool


class TextTokenizer:
    """A checkpoint's fast tokenizer (`tokenizer.json`) with its pad id and length limit.

    Encodes exactly like `transformers.AutoTokenizer.from_pretrained(model_dir)` (same
    normalizer, pre-tokenizer, model and `[CLS] A [SEP] B [SEP]` post-processor), without
    importing transformers. Thread-safe and picklable, so grain can map with it.

    Attributes:
      backend: the `tokenizers.Tokenizer`, with padding and truncation turned off.
      pad_id: id used to pad batches.
      model_max_length: longest input the model accepts (from tokenizer_config.json).
      max_positions: the model's position table size (from its config.json); None if unknown.
      limits_source: the file `max_positions` comes from (named in errors).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        pad_id: int,
        model_max_length: int,
        max_positions: int | None = None,
        limits_source: str = "",
    ):
        self.backend = tokenizers.Tokenizer.from_str(backend.to_str())  # private copy
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_id = pad_id
        self.model_max_length = model_max_length
        self.max_positions = max_positions
        self.limits_source = limits_source
        self._truncating: dict[int, tokenizers.Tokenizer] = {}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(
        self, text: str, text_pair: str | None = None, *, max_length: int | None = None
    ) -> Encoded:
        """Tokenizes `text` (and `text_pair`), adding special tokens.

        Args:
          text: first text.
          text_pair: optional second text (token type 1).
          max_length: if set, longer encodings are truncated longest-first to this many tokens,
            special tokens included.

        Returns:
          The `Encoded` example.
        """
        enc = self.backend.encode(text, text_pair)
        if max_length is None or len(enc.ids) <= max_length:
            return Encoded(enc.ids, enc.type_ids, False)
        enc = self._truncator(max_length).encode(text, text_pair)
        return Encoded(enc.ids, enc.type_ids, True)

    def truncated_lengths(self, texts: list, max_length: int) -> list[int]:
        """Token counts of ``texts`` (strings, or (text, text_pair) tuples) encoded as
        ``encode(..., max_length=max_length)`` encodes them, in one batch."""
        return [len(e.ids) for e in self._truncator(max_length).encode_batch(texts)]

    def _truncator(self, max_length: int) -> tokenizers.Tokenizer:
        # A copy per length, so no thread ever changes the settings of a tokenizer in use.
        if max_length not in self._truncating:
            tok = tokenizers.Tokenizer.from_str(self.backend.to_str())
            tok.enable_truncation(max_length)
            self._truncating[max_length] = tok
        return self._truncating[max_length]

    def __getstate__(self) -> dict[str, Any]:
        return {
            "backend": self.backend.to_str(),
            "pad_id": self.pad_id,
            "model_max_length": self.model_max_length,
            "max_positions": self.max_positions,
            "limits_source": self.limits_source,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            tokenizers.Tokenizer.from_str(state["backend"]),
            pad_id=state["pad_id"],
            model_max_length=state["model_max_length"],
            max_positions=state.get("max_positions"),
            limits_source=state.get("limits_source", ""),
        )


def _token_content(token: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    return token.get("content") if isinstance(token, Mapping) else token


def load_tokenizer(model_dir: str | pathlib.Path) -> TextTokenizer:
    """Loads the tokenizer of a local Hugging Face checkpoint directory.

    Args:
      model_dir: directory with `tokenizer.json` and, optionally, `tokenizer_config.json`
        (for the pad token and `model_max_length`) and the model's `config.json` (for its
        `vocab_size` and `max_position_embeddings`).

    Returns:
      A `TextTokenizer`.

    Raises:
      FileNotFoundError: the directory has no `tokenizer.json`.
      ValueError: the tokenizer has more token ids than the model's `vocab_size`.
    """
    model_dir = pathlib.Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: sft_jax needs a fast tokenizer file. Save one with "
            "transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir)."
        )
    backend = tokenizers.Tokenizer.from_file(str(path))
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    pad_token = _token_content(config.get("pad_token"))
    if pad_token is None and backend.padding:
        pad_token = backend.padding["pad_token"]
    pad_id = backend.token_to_id(pad_token) if pad_token else None
    # Some configs say 1e30 for "no limit"; keep an int.
    max_len = int(min(float(config.get("model_max_length", 512)), 2**31 - 1))
    limits = read_model_limits(model_dir)
    if limits.vocab_size is not None:
        where = f"{path} vs {limits.source}"
        check_tokenizer_fits(tokenizer_id_limit(backend), limits.vocab_size, where)
    return TextTokenizer(
        backend,
        pad_id=0 if pad_id is None else pad_id,
        model_max_length=max_len,
        max_positions=limits.max_positions,
        limits_source=limits.source,
    )
