"""Tokenization and length-bucketed batching of text classification records (grain).

`text_cls_dataset` turns a random access source of records
(`{"text": bytes, "label": int, ["text_pair": bytes]}`, see `sft_jax.data.builders`) into a
`grain.MapDataset` of padded numpy batches:

    input_ids       int32   [B, T]  token ids, padded with the tokenizer's pad id
    attention_mask  int32   [B, T]  1 on real tokens
    token_type_ids  int32   [B, T]  segment ids (1 on the second text of a pair)
    labels          int32   [B]
    example_mask    float32 [B]     1 for real examples, 0 for filler rows

B is always `batch_size`; T is the smallest bucket that holds the batch's longest sequence,
so a jitted step compiles once per bucket. Filler rows (only in a last, short batch when
`drop_remainder=False`) hold the encoding of an empty text (`[CLS] [SEP]` for BERT) so no row
is fully masked (an all-masked softmax is NaN); `example_mask` removes them from losses and
metrics. Sequences longer than `max_length` are truncated by the tokenizer, which keeps the
special tokens (the final `[SEP]`); `text_cls_dataset` logs one warning per split with how many
were cut, or rejects the split when asked to (`truncate=False`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from sft_jax.data.limits import (
    check_max_length,
    check_tokenizer_fits,
    read_model_limits,
    tokenizer_id_limit,
)

_LOG = logging.getLogger(__name__)


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


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= `length` (buckets ascending); ValueError if none is."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"Sequence of length {length} is longer than the largest bucket {buckets}")


def check_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """Validates buckets: positive, strictly ascending, the last equal to `max_length`."""
    try:
        buckets = tuple(int(b) for b in buckets)
    except (TypeError, ValueError):
        raise ValueError(f"data.buckets must be integers; got {tuple(buckets)!r}") from None
    ascending = all(a < b for a, b in zip(buckets, buckets[1:]))
    if not buckets or buckets[0] <= 0 or not ascending or buckets[-1] != max_length:
        raise ValueError(
            "data.buckets must be positive, strictly ascending and end with "
            f"data.max_length={max_length}; got {buckets}"
        )
    return buckets


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class _Encode:
    """Grain map: a record -> token ids [L] (L <= max_length), segment ids [L], label."""

    tokenizer: TextTokenizer
    max_length: int
    text_pair: bool

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        pair = _as_str(record["text_pair"]) if self.text_pair else None
        enc = self.tokenizer.encode(_as_str(record["text"]), pair, max_length=self.max_length)
        return {
            "input_ids": np.asarray(enc.input_ids, np.int32),
            "token_type_ids": np.asarray(enc.token_type_ids, np.int32),
            "label": int(record["label"]),
        }


@dataclasses.dataclass(frozen=True)
class _Collate:
    """Grain batch_fn: pads up to `batch_size` rows and to the smallest fitting bucket."""

    batch_size: int
    buckets: tuple[int, ...]
    pad_id: int
    filler: Mapping[str, Any]  # encoding of an empty text, for rows past the last example

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        rows = list(examples) + [self.filler] * (self.batch_size - len(examples))
        t = pick_bucket(max(len(r["input_ids"]) for r in rows), self.buckets)
        input_ids = np.full((self.batch_size, t), self.pad_id, np.int32)  # [B, T]
        attention_mask = np.zeros((self.batch_size, t), np.int32)  # [B, T]
        token_type_ids = np.zeros((self.batch_size, t), np.int32)  # [B, T]
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = row["input_ids"]
            attention_mask[i, :n] = 1
            token_type_ids[i, :n] = row["token_type_ids"]
        example_mask = np.zeros(self.batch_size, np.float32)  # [B]
        example_mask[: len(examples)] = 1.0
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": np.asarray([r["label"] for r in rows], np.int32),  # [B]
            "example_mask": example_mask,
        }


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in one epoch of `num_examples` (what `text_cls_dataset` yields per epoch)."""
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def text_cls_dataset(
    source: Sequence[Mapping[str, Any]],
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    buckets: Sequence[int],
    max_length: int,
    shuffle: bool,
    seed: int,
    num_epochs: int | None,
    drop_remainder: bool,
    text_pair: bool = False,
    truncate: bool = True,
    split: str = "",
) -> grain.MapDataset:
    """Tokenized, bucketed, padded batches of a text classification source.

    Each epoch is shuffled with its own seed (`seed + epoch`) yet reproducibly, tokenized per
    example and batched within the epoch (no batch spans two epochs). `ds[i]` is always batch
    `i`, so a trainer resumes at a step by indexing, or by `set_state` on an iterator of
    `ds.to_iter_dataset()`. `len(ds)` is `num_batches(...) * num_epochs` (`sys.maxsize` when
    `num_epochs` is None).

    Args:
      source: records with `text` (bytes or str), `label` (int) and, when `text_pair`,
        `text_pair`.
      tokenizer: from `load_tokenizer`.
      batch_size: rows per batch (B); always the leading dimension.
      buckets: ascending sequence lengths to pad to; the last must equal `max_length`.
      max_length: longer encodings are truncated (special tokens kept).
      shuffle: shuffle examples (training) or keep source order (evaluation).
      seed: shuffle seed, 0 <= seed < 2**32.
      num_epochs: passes over the data; None repeats forever.
      drop_remainder: drop a last short batch (training) or pad it with filler rows
        (`example_mask` 0; evaluation).
      text_pair: encode `text_pair` as the second segment.
      truncate: cut examples longer than `max_length` (one warning with the count) or, when
        False, reject the split if any example is longer.
      split: the split's name, for the warning and errors.

    Returns:
      A `grain.MapDataset` of batch dicts (see the module docstring).

    Raises:
      ValueError: bad buckets; `max_length` longer than the model's positions; with
        `truncate=False`, an example longer than `max_length`.
    """
    buckets = check_buckets(buckets, max_length)
    check_max_length(
        max_length, tokenizer.max_positions, "data.max_length", tokenizer.limits_source
    )
    report_long_examples(
        source, token_lengths(source, tokenizer, text_pair), max_length, truncate, split
    )
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.map(_Encode(tokenizer, max_length, text_pair))
    empty = tokenizer.encode("", "" if text_pair else None)
    filler = {"input_ids": empty.input_ids, "token_type_ids": empty.token_type_ids, "label": 0}
    ds = ds.batch(
        batch_size,
        drop_remainder=drop_remainder,
        batch_fn=_Collate(batch_size, buckets, tokenizer.pad_id, filler),
    )
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the upstream shuffle every epoch
    return ds


def token_lengths(
    source: Sequence[Mapping[str, Any]], tokenizer: TextTokenizer, text_pair: bool = False
) -> list[int]:
    """Untruncated token counts (special tokens included) of every record of `source`."""
    records = [source[i] for i in range(len(source))]
    texts = [_as_str(r["text"]) for r in records]
    if text_pair:
        texts = list(zip(texts, [_as_str(r["text_pair"]) for r in records]))
    return [len(e.ids) for e in tokenizer.backend.encode_batch(texts)]


def report_long_examples(
    source: Sequence[Mapping[str, Any]],
    lengths: Sequence[int],
    max_length: int,
    truncate: bool,
    split: str = "",
) -> int:
    """Logs one warning with the number of examples longer than `max_length`, or rejects them.

    Args:
      source: the records `lengths` belong to (the first long one's `id` is named).
      lengths: untruncated token counts (`token_lengths`).
      max_length: `data.max_length`.
      truncate: warn (True) or raise (False) when some example is longer.
      split: the split's name, for the message.

    Returns:
      How many examples are longer than `max_length` (and will be truncated).

    Raises:
      ValueError: `truncate` is False and some example is longer than `max_length`.
    """
    long = [i for i, n in enumerate(lengths) if n > max_length]
    if not long:
        return 0
    first = source[long[0]]
    first_id = int(first["id"]) if "id" in first else long[0]
    where = f" of split {split!r}" if split else ""
    what = (
        f"{len(long)} of {len(lengths)} examples{where} are longer than "
        f"data.max_length={max_length} tokens (longest: {max(lengths)} tokens; first: record id "
        f"{first_id})"
    )
    if not truncate:
        raise ValueError(f"{what}; raise data.max_length or set data.truncate=True")
    _LOG.warning("%s; they are truncated to %d tokens", what, max_length)
    return len(long)


def length_stats(
    source: Sequence[Mapping[str, Any]],
    tokenizer: TextTokenizer,
    *,
    buckets: Sequence[int],
    max_length: int,
    text_pair: bool = False,
) -> dict[str, Any]:
    """Counts examples per bucket (by their own length) and truncated examples.

    Returns:
      `{"num_examples", "num_truncated", "max_tokens" (before truncation),
      "bucket_counts": {bucket: count}}`.
    """
    buckets = check_buckets(buckets, max_length)
    lengths = token_lengths(source, tokenizer, text_pair)
    counts = {b: 0 for b in buckets}
    for n in lengths:
        counts[pick_bucket(min(n, max_length), buckets)] += 1
    return {
        "num_examples": len(lengths),
        "num_truncated": sum(n > max_length for n in lengths),
        "max_tokens": max(lengths, default=0),
        "bucket_counts": counts,
    }
