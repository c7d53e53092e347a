"""Chat SFT examples: validation, token ids with an assistant-only loss mask, packing, targets.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`: an
optional leading system message, then user and assistant turns alternating, starting with user,
with at least one assistant turn (`validate_messages`).

`encode_chat` renders it with the tokenizer's own chat template and tokenizes the text without
adding special tokens. `loss_mask` is 1 exactly on the tokens of each assistant turn's content
and on that turn's end-of-turn token (`<|im_end|>` for ChatML); system and user turns, the
template's role headers and the generation prompt (`<|im_start|>assistant\\n`) carry no loss.
The spans are found generically by rendering prefixes of the conversation: the text between
"messages[:k] + generation prompt" and "messages[:k + 1]" is assistant turn k's reply. Of that
text, the content plus the first special token after it (the end-of-turn token) is marked;
without a special token, the reply up to its trailing whitespace is. Character spans map to
tokens through the tokenizer's offsets.

Rows (`pack`, `pad_row`) are dicts of int32 arrays `[seq_len]`:

    input_ids    token ids, `pad_id` on padding
    loss_mask    1 on assistant content / end-of-turn tokens
    segment_ids  1, 2, 3, ... per conversation in the row, 0 on padding
    positions    position within the conversation (restarts at 0 per segment)

Causal-LM convention (`shift_targets`): the logits at position t predict token t + 1, so
`targets[t] = input_ids[t + 1]` when t + 1 is in the same segment, and
`target_mask[t] = loss_mask[t + 1]` there (0 otherwise). The last token of each segment (and
padding) has no target. The loss is `sum(target_mask * xent(logits, targets)) / sum(target_mask)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
ROW_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ChatEncoded:
    """One tokenized conversation.

    Attributes:
      input_ids: int32 [T] token ids of the rendered chat template.
      loss_mask: int32 [T] 1 on assistant content and end-of-turn tokens.
      truncated: whether tokens were cut from the right to fit `max_length`.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass(frozen=True)
class Packed:
    """Packed rows and how many conversations were cut to fit `seq_len`."""

    rows: list[dict[str, np.ndarray]]
    num_truncated: int


def validate_messages(messages: Any, *, where: str) -> list[dict[str, str]]:
    """Checks a conversation and returns it as a list of `{"role", "content"}` dicts.

    Args:
      messages: the conversation (e.g. one JSONL record's `messages`).
      where: location for error messages, e.g. "train.jsonl, line 7".

    Returns:
      The turns, as new dicts with only "role" and "content".

    Raises:
      ValueError: naming `where` and the turn at fault, for a non-list or empty conversation, a
        turn that is not an object, an unknown role, empty or non-string content, roles out of
        order, or no assistant turn.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of turns, got {messages!r}")
    out = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}: turn {i} must be an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ValueError(
                f"{where}: turn {i} has unknown role {role!r} (expected system, user or assistant)"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: turn {i} ({role}) content must be a string, got {type(content).__name__}"
            )
        if not content.strip():
            raise ValueError(f"{where}: turn {i} ({role}) has empty content")
        expected = _expected_role(i, has_system=messages[0].get("role") == "system")
        if role != expected:
            raise ValueError(
                f"{where}: turn {i} has role {role!r}, expected {expected!r} (an optional system "
                "turn first, then user and assistant alternating, starting with user)"
            )
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise ValueError(f"{where}: conversation has no assistant turn")
    return out


def _expected_role(i: int, *, has_system: bool) -> str:
    if has_system:
        return "system" if i == 0 else ("user" if i % 2 == 1 else "assistant")
    return "user" if i % 2 == 0 else "assistant"


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _special_tokens(tokenizer: Any) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


def _reply_span(reply: str, content: str, specials: Sequence[str]) -> int:
    """Length of the marked part of one rendered assistant reply (content + end-of-turn)."""
    found = reply.find(content)
    if found < 0:
        found, content = reply.find(content.strip()), content.strip()
    after = found + len(content) if found >= 0 else 0
    hits = [(reply.find(s, after), -len(s)) for s in specials if reply.find(s, after) >= 0]
    if hits:
        start, neg_len = min(hits)
        return start - neg_len
    return len(reply.rstrip())


def assistant_char_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, str]]
) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of assistant replies in the rendered conversation.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      messages: a validated conversation.

    Returns:
      The rendered text's spans to train on, one per assistant turn, in order.

    Raises:
      ValueError: if the template does not render prefixes of the conversation as prefixes of
        its full rendering (then turns cannot be located).
    """
    full = _render(tokenizer, messages, generation=False)
    specials = _special_tokens(tokenizer)
    spans = []
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], generation=True)
        upto = _render(tokenizer, messages[: k + 1], generation=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(
                f"chat template does not render turn {k} as a prefix of the conversation; "
                "cannot locate assistant tokens"
            )
        reply = upto[len(prompt) :]
        spans.append((len(prompt), len(prompt) + _reply_span(reply, turn["content"], specials)))
    return spans


def encode_chat(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, *, max_length: int | None = None
) -> ChatEncoded:
    """Tokenizes a conversation with its chat template and an assistant-only loss mask.

    Args:
      messages: a conversation (see `validate_messages`; checked here with where="messages").
      tokenizer: a transformers fast tokenizer with a `chat_template`.
      max_length: if set, keep only the first `max_length` tokens; this can cut every
        assistant token, leaving `loss_mask` all 0 (`lm.chat_lm_rows` drops those).

    Returns:
      The `ChatEncoded` ids, loss mask and truncation flag.
    """
    messages = validate_messages(messages, where="messages")
    text = _render(tokenizer, messages, generation=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), np.int32)
    for start, end in assistant_char_spans(tokenizer, messages):
        mask |= ((offsets[:, 0] < end) & (offsets[:, 1] > start)).astype(np.int32)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return ChatEncoded(input_ids=ids, loss_mask=mask, truncated=truncated)


def _empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(seq_len, np.int32) for k in ROW_KEYS}
    row["input_ids"][:] = pad_id
    return row


def pad_row(encoded: ChatEncoded, seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One conversation per row (no packing), cut or padded to `seq_len`.

    Args:
      encoded: the conversation.
      seq_len: row length.
      pad_id: id written on padding.

    Returns:
      A row (see the module docstring); segment_ids is 1 on real tokens, 0 on padding, and
      positions is `arange(seq_len)`.
    """
    n = min(len(encoded), seq_len)
    row = _empty_row(seq_len, pad_id)
    row["input_ids"][:n] = encoded.input_ids[:n]
    row["loss_mask"][:n] = encoded.loss_mask[:n]
    row["segment_ids"][:n] = 1
    row["positions"][:] = np.arange(seq_len, dtype=np.int32)
    return row


def pack(encoded: Sequence[ChatEncoded], seq_len: int, *, pad_id: int = 0) -> Packed:
    """Greedy first-fit packing of conversations into rows of `seq_len` tokens.

    Each conversation, in order, goes into the first row with room for all of it, else into a
    new row. Conversations longer than `seq_len` are cut to `seq_len` (and counted); empty ones
    are skipped.

    Args:
      encoded: the conversations.
      seq_len: row length.
      pad_id: id written on padding.

    Returns:
      `Packed` rows (segment ids 1, 2, ... in order of placement within a row, positions
      restarting at 0 per segment, 0 on padding) and the number of conversations cut.
    """
    rows: list[dict[str, np.ndarray]] = []
    used: list[int] = []
    segments: list[int] = []
    num_truncated = 0
    for ex in encoded:
        n = len(ex)
        if n == 0:
            continue
        if n > seq_len:
            n, num_truncated = seq_len, num_truncated + 1
        r = next((i for i, u in enumerate(used) if u + n <= seq_len), len(rows))
        if r == len(rows):
            rows.append(_empty_row(seq_len, pad_id))
            used.append(0)
            segments.append(0)
        s, segments[r] = used[r], segments[r] + 1
        row = rows[r]
        row["input_ids"][s : s + n] = ex.input_ids[:n]
        row["loss_mask"][s : s + n] = ex.loss_mask[:n]
        row["segment_ids"][s : s + n] = segments[r]
        row["positions"][s : s + n] = np.arange(n, dtype=np.int32)
        used[r] += n
    return Packed(rows=rows, num_truncated=num_truncated)


def shift_targets(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds next-token `targets` and `target_mask` to a row (or a batch of rows).

    Args:
      row: arrays `[..., T]` with `input_ids`, `loss_mask` and `segment_ids`.

    Returns:
      A new dict with the row's arrays plus `targets[t] = input_ids[t + 1]` and
      `target_mask[t] = loss_mask[t + 1]` where t + 1 is in t's (non-padding) segment; both are
      0 elsewhere (the last token of each segment, padding).
    """
    ids = np.asarray(row["input_ids"])
    seg = np.asarray(row["segment_ids"])
    same = np.zeros(ids.shape, bool)
    same[..., :-1] = (seg[..., :-1] == seg[..., 1:]) & (seg[..., :-1] != 0)
    nxt_ids = np.zeros_like(ids)
    nxt_ids[..., :-1] = ids[..., 1:]
    nxt_mask = np.zeros(ids.shape, np.int32)
    nxt_mask[..., :-1] = np.asarray(row["loss_mask"])[..., 1:]
    out = dict(row)
    out["targets"] = np.where(same, nxt_ids, 0).astype(np.int32)
    out["target_mask"] = np.where(same, nxt_mask, 0).astype(np.int32)
    return out
