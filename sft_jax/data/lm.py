"""Chat SFT batches for causal LMs: conversations -> packed (or padded) rows -> grain batches.

`chat_lm_rows` tokenizes every conversation of a source once (`chat.encode_chat`: the
tokenizer's chat template, loss on assistant content and end-of-turn tokens), orders them with a
fixed seed and packs them into rows of `seq_len` tokens (`chat.pack`), or pads one conversation
per row (`chat.pad_row`). A conversation cut so short that none of its assistant tokens is left
is dropped (counted in `Rows.num_dropped`, with a warning). `chat_lm_dataset` turns rows into
a `grain.MapDataset` of batches:

    input_ids    int32 [B, T]  token ids (`pad_id` on padding)
    targets      int32 [B, T]  the token each position predicts (`chat.shift_targets`)
    target_mask  int32 [B, T]  1 where that target carries loss
    segment_ids  int32 [B, T]  1, 2, ... per conversation in the row, 0 on padding
    positions    int32 [B, T]  position within the conversation
    loss_mask    int32 [B, T]  1 on assistant tokens (before the shift)

Training batches are full (`drop_remainder`), shuffled per epoch with a seeded reshuffle of the
rows; evaluation batches keep row order and fill the last batch with empty rows (segment 0, no
targets), which add nothing to losses. Packing keeps the number of rows fixed, so an epoch is
always the same number of steps and batch `i` of a run is always the same batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from sft_jax.data import chat
from sft_jax.data.limits import check_tokenizer_fits, read_model_limits, tokenizer_id_limit
from sft_jax.data.records import check_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows of one split and what building them dropped.

    Attributes:
      rows: dicts of int32 [seq_len] arrays (`chat.ROW_KEYS`).
      num_conversations: conversations in the source.
      num_truncated: conversations cut to fit `seq_len` (the dropped ones included).
      num_tokens: real (non-padding) tokens over all rows.
      num_loss_tokens: tokens carrying loss over all rows.
      pad_id: the id on padding positions.
      num_dropped: conversations cut so short that no token carrying loss was left; they are
        in no row (they would cost compute and train nothing).
    """

    rows: list[dict[str, np.ndarray]]
    num_conversations: int
    num_truncated: int
    num_tokens: int
    num_loss_tokens: int
    pad_id: int
    num_dropped: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def max_segments(self) -> int:
        """The most conversations in one row (what ``runtime.packed_max_segments`` must cover
        for cuDNN's packed layout to take every batch)."""
        return max((int(r["segment_ids"].max()) for r in self.rows), default=0)


def load_chat_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer (with chat template) of a Hugging Face directory or a GGUF file.

    Raises:
      ValueError: the tokenizer has no chat template, or (a directory) more token ids than the
        `vocab_size` of the model's `config.json`; the path is named.
    """
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        from sft_jax.hf.gguf import load_gguf_tokenizer

        tok = load_gguf_tokenizer(path)
    else:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(path))
        limits = read_model_limits(path)
        if limits.vocab_size is not None:
            where = f"{path} (tokenizer) vs {limits.source}"
            check_tokenizer_fits(tokenizer_id_limit(tok), limits.vocab_size, where)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{path}: the tokenizer has no chat template; chat SFT needs one")
    return tok


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids that end an assistant turn: EOS and the template's end-of-turn token, if any."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding never carries loss)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _keep_with_loss(encoded: list[chat.ChatEncoded], seq_len: int) -> list[chat.ChatEncoded]:
    """The conversations that still carry loss after truncation, in order.

    Raises:
      ValueError: naming data.max_length when truncation left none of them any loss.
    """
    kept = [e for e in encoded if not e.truncated or e.loss_mask.any()]
    if encoded and not kept:
        raise ValueError(
            f"all {len(encoded)} conversations have no assistant token within the first "
            f"data.max_length={seq_len} tokens, so nothing is left to train on; raise "
            "data.max_length"
        )
    return kept


def chat_lm_rows(
    source: Sequence[dict],
    tokenizer: Any,
    *,
    seq_len: int,
    pack: bool,
    seed: int,
    shuffle: bool,
) -> Rows:
    """Tokenizes a split's conversations and lays them out in rows.

    Args:
      source: records with `messages` (see `sft_jax.data.chat_builders`).
      tokenizer: a transformers tokenizer with a chat template.
      seq_len: row length; longer conversations are cut from the right (and counted), and
        those left with no assistant token are dropped (and counted).
      pack: several conversations per row (first-fit) instead of one per row.
      seed: order of conversations before packing (with `shuffle`).
      shuffle: permute conversations before packing (training) or keep source order.

    Returns:
      The rows and counts (logged as well; warnings when conversations were cut or dropped).

    Raises:
      ValueError: if every conversation was dropped.
    """
    order = np.arange(len(source))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(source))
    pad_id = pad_token_id(tokenizer)
    encoded = [
        chat.encode_chat(source[int(i)]["messages"], tokenizer, max_length=seq_len) for i in order
    ]
    kept = _keep_with_loss(encoded, seq_len)
    if pack:
        rows = chat.pack(kept, seq_len, pad_id=pad_id).rows
    else:
        rows = [chat.pad_row(e, seq_len, pad_id=pad_id) for e in kept]
    out = Rows(
        rows=rows,
        num_conversations=len(encoded),
        num_truncated=sum(e.truncated for e in encoded),
        num_tokens=int(sum(int((r["segment_ids"] > 0).sum()) for r in rows)),
        num_loss_tokens=int(sum(int(r["loss_mask"].sum()) for r in rows)),
        pad_id=pad_id,
        num_dropped=len(encoded) - len(kept),
    )
    _log_rows(out, seq_len)
    return out


def _log_rows(out: Rows, seq_len: int) -> None:
    log.info(
        "%d conversations -> %d rows of %d tokens (%.0f%% filled, at most %d per row, %d cut "
        "to fit, %d dropped)",
        out.num_conversations,
        len(out.rows),
        seq_len,
        100.0 * out.num_tokens / max(len(out.rows) * seq_len, 1),
        out.max_segments,
        out.num_truncated,
        out.num_dropped,
    )
    if out.num_truncated:
        log.warning(
            "%d of %d conversations are longer than data.max_length=%d tokens and were cut "
            "from the right to fit",
            out.num_truncated,
            out.num_conversations,
            seq_len,
        )
    if out.num_dropped:
        log.warning(
            "%d of %d conversations have no assistant token within the first data.max_length=%d "
            "tokens (the cut removed every token that carries loss) and were dropped",
            out.num_dropped,
            out.num_conversations,
            seq_len,
        )


@dataclasses.dataclass(frozen=True)
class _Collate:
    """Grain batch_fn: stacks the rows of a batch at ``positions`` (``records.check_rows``) and
    shifts the targets."""

    positions: range

    def __call__(self, batch: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        mine = list(batch)[self.positions.start : self.positions.stop]
        stacked = {k: np.stack([r[k] for r in mine]) for k in chat.ROW_KEYS}
        return chat.shift_targets(stacked)


def _filler(row: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """An empty row shaped like ``row``: segment 0 everywhere, so no loss and no targets."""
    out = {k: np.zeros_like(v) for k, v in row.items()}
    out["input_ids"][:] = pad_id
    return out


def chat_lm_dataset(
    rows: Rows,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_epochs: int | None,
    drop_remainder: bool,
    process_rows: slice | None = None,
) -> grain.MapDataset:
    """A `grain.MapDataset` of batches (see the module docstring) over `rows`.

    Args:
      rows: from `chat_lm_rows`.
      batch_size: rows per batch.
      shuffle: reshuffle rows every epoch (seeded).
      seed: shuffle seed.
      num_epochs: passes over the rows; None repeats forever.
      drop_remainder: drop a last partial batch (training) or fill it with empty rows.
      process_rows: stack only these rows of every batch (a process's share,
        `sharding.feed_rows`; `sft_jax.data.records`). None: all `batch_size` rows.

    Raises:
      ValueError: no rows, or fewer rows than a batch when dropping the remainder.
    """
    if not rows.rows:
        raise ValueError("the split has no conversations")
    if drop_remainder and len(rows) < batch_size:
        raise ValueError(f"{len(rows)} rows, fewer than batch_size={batch_size}")
    items = list(rows.rows)
    if not drop_remainder and len(items) % batch_size:
        items += [_filler(items[0], rows.pad_id)] * (batch_size - len(items) % batch_size)
    ds = grain.MapDataset.source(items)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    collate = _Collate(check_rows(process_rows, batch_size))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the upstream shuffle every epoch
    return ds
