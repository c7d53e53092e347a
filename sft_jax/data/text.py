"""Tokenization and length-bucketed batching of text classification records (grain).

`text_cls_dataset` turns a random access source of records
(`{"text": bytes, "label": int, ["text_pair": bytes]}`, see `sft_jax.data.builders`) into a
`grain.MapDataset` of padded numpy batches:

    input_ids       int32   [B, T]  token ids, padded with the tokenizer's pad id
    attention_mask  int32   [B, T]  1 on real tokens
    token_type_ids  int32   [B, T]  segment ids (1 on the second text of a pair)
    labels          int32   [B]
    example_mask    float32 [B]     1 for real examples, 0 for filler rows

B is always `batch_size` (or the rows one process builds, `process_rows`); T is the smallest
bucket that holds the whole batch's longest sequence, so a jitted step compiles once per
bucket. Filler rows (only in a last, short batch when
`drop_remainder=False`) hold the encoding of an empty text (`[CLS] [SEP]` for BERT) so no row
is fully masked (an all-masked softmax is NaN); `example_mask` removes them from losses and
metrics. Sequences longer than `max_length` are truncated by the tokenizer, which keeps the
special tokens (the final `[SEP]`); `text_cls_dataset` logs one warning per split with how many
were cut, or rejects the split when asked to (`truncate=False`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sft_jax.data.limits import check_max_length
from sft_jax.data.records import check_rows, read_records
from sft_jax.data.tokenizer import TextTokenizer

_LOG = logging.getLogger(__name__)


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
    """Pads encoded rows into arrays of `t` tokens; positions past the batch's last example
    (`num_examples`) get the `filler` row and `example_mask` 0."""

    buckets: tuple[int, ...]
    pad_id: int
    filler: Mapping[str, Any]  # encoding of an empty text, for rows past the last example

    def __call__(
        self, examples: Sequence[Mapping[str, Any]], positions: range, num_examples: int, t: int
    ) -> dict[str, np.ndarray]:
        rows = list(examples) + [self.filler] * (len(positions) - len(examples))
        n = len(rows)
        input_ids = np.full((n, t), self.pad_id, np.int32)  # [B, T]
        attention_mask = np.zeros((n, t), np.int32)  # [B, T]
        token_type_ids = np.zeros((n, t), np.int32)  # [B, T]
        for i, row in enumerate(rows):
            k = len(row["input_ids"])
            input_ids[i, :k] = row["input_ids"]
            attention_mask[i, :k] = 1
            token_type_ids[i, :k] = row["token_type_ids"]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": np.asarray([r["label"] for r in rows], np.int32),  # [B]
            "example_mask": (np.asarray(positions) < num_examples).astype(np.float32),  # [B]
        }


@dataclasses.dataclass(frozen=True)
class _Load:
    """Grain map: a batch of source indices -> its padded rows at `positions`
    (`records.check_rows`).

    The bucket comes from the encoded lengths of the whole batch (`lengths`, known before any
    batch is built), so every process pads its rows to the length one process would."""

    source: Sequence[Mapping[str, Any]]
    encode: _Encode
    collate: _Collate
    lengths: tuple[int, ...]  # encoded (truncated) length of every record of `source`
    batch_size: int
    positions: range

    def __call__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        longest = max(self.lengths[i] for i in indices)
        if len(indices) < self.batch_size:  # filler rows at the end
            longest = max(longest, len(self.collate.filler["input_ids"]))
        t = pick_bucket(longest, self.collate.buckets)
        mine = indices[self.positions.start : self.positions.stop]
        examples = [self.encode(r) for r in read_records(self.source, mine)]
        return self.collate(examples, self.positions, len(indices), t)


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
    process_rows: slice | None = None,
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
      tokenizer: from `sft_jax.data.tokenizer.load_tokenizer`.
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
      process_rows: build only these rows of every batch, a process's share
        (`sharding.feed_rows`, `sft_jax.data.records`): only their records are read and
        tokenized, padded to the bucket of the whole batch. None: all `batch_size` rows.

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
    lengths = token_lengths(source, tokenizer, text_pair)
    report_long_examples(source, lengths, max_length, truncate, split)
    encode = _Encode(tokenizer, max_length, text_pair)
    empty = tokenizer.encode("", "" if text_pair else None)
    filler = {"input_ids": empty.input_ids, "token_type_ids": empty.token_type_ids, "label": 0}
    load = _Load(
        source,
        encode,
        _Collate(buckets, tokenizer.pad_id, filler),
        encoded_lengths(source, lengths, tokenizer, max_length, text_pair),
        batch_size,
        check_rows(process_rows, batch_size),
    )
    # Indices are shuffled and batched first: a batch reads (and encodes) only its own rows.
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list).map(load)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the upstream shuffle every epoch
    return ds


def _texts(records: Sequence[Mapping[str, Any]], text_pair: bool) -> list:
    """What the tokenizer's batch encoding takes: texts, or (text, text_pair) tuples."""
    texts = [_as_str(r["text"]) for r in records]
    if text_pair:
        texts = list(zip(texts, [_as_str(r["text_pair"]) for r in records]))
    return texts


def token_lengths(
    source: Sequence[Mapping[str, Any]], tokenizer: TextTokenizer, text_pair: bool = False
) -> list[int]:
    """Untruncated token counts (special tokens included) of every record of `source`."""
    texts = _texts([source[i] for i in range(len(source))], text_pair)
    return [len(e.ids) for e in tokenizer.backend.encode_batch(texts)]


def encoded_lengths(
    source: Sequence[Mapping[str, Any]],
    lengths: Sequence[int],
    tokenizer: TextTokenizer,
    max_length: int,
    text_pair: bool,
) -> tuple[int, ...]:
    """The length of every record's encoding as the pipeline makes it: its untruncated token
    count (`lengths`) where that fits `max_length`, else that of its truncated encoding (the
    longer records encoded again, in one batch)."""
    out = list(lengths)
    long = [i for i, n in enumerate(lengths) if n > max_length]
    if long:
        texts = _texts([source[i] for i in long], text_pair)
        for i, n in zip(long, tokenizer.truncated_lengths(texts, max_length)):
            out[i] = n
    return tuple(out)


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
