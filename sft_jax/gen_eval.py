"""Generation-based evaluation of chat models: replies to held-out prompts, exact match.

A conversation's prompt is every turn before its last assistant turn, rendered with the
tokenizer's chat template and its generation prompt; the reference is that last assistant
turn (or the record's ``answer`` when present). Replies are decoded greedily with the KV cache
(``sft_jax.generate``) in fixed-size, left-padded batches whose prompt length is rounded up to
a multiple of ``length_multiple``, so a whole split compiles a handful of times at most.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sft_jax.data import chat
from sft_jax.data.instruct_tasks import exact_match
from sft_jax.data.lm import pad_token_id, stop_token_ids
from sft_jax.generate import generate, position_limit


@dataclasses.dataclass(frozen=True)
class Reply:
    """One generated reply: text (stop token cut), whether it ended with a stop token, and
    its length in tokens (stop token included)."""

    text: str
    stopped: bool
    num_tokens: int


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and the generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _left_pad(
    prompts: Sequence[list[int]], rows: int, multiple: int, pad_id: int, most: int | None = None
):
    """int32 ids and mask [rows, T], T = longest prompt rounded up to ``multiple`` but not past
    ``most`` (a learned position table's room) unless the longest prompt itself is; missing
    rows repeat the first prompt (their replies are dropped)."""
    longest = max(len(p) for p in prompts)
    t = -(-longest // multiple) * multiple
    if most is not None:
        t = max(longest, min(t, most))
    ids = np.full((rows, t), pad_id, np.int32)
    mask = np.zeros((rows, t), np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else prompts[0]
        ids[i, t - len(p) :] = p
        mask[i, t - len(p) :] = 1
    return ids, mask


def generate_replies(
    model: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    length_multiple: int = 32,
    **sampling: Any,
) -> list[Reply]:
    """Replies to tokenized prompts (greedy unless ``sampling`` sets a temperature and rng).

    Args:
      model: a causal LM.
      tokenizer: its chat tokenizer (stop tokens, pad id, decoding).
      prompts: token ids per prompt, e.g. from ``prompt_ids``.
      batch_size: prompts per ``generate`` call (the last batch is filled up).
      max_new_tokens: longest reply.
      length_multiple: prompt lengths are padded to a multiple of this.
      **sampling: ``temperature``, ``top_k``, ``top_p``, ``rng`` for ``generate``. Batch ``i``
        samples with ``fold_in(rng, i)``: one key for every batch would give row ``r`` of each
        batch the same random draws, so equal prompts in different batches got equal replies.
    """
    stops = stop_token_ids(tokenizer)
    pad = pad_token_id(tokenizer)
    rng = sampling.pop("rng", None)
    limit = position_limit(model)
    room = None if limit is None else limit - max_new_tokens
    replies = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        ids, mask = _left_pad(chunk, batch_size, length_multiple, pad, room)
        key = None if rng is None else jax.random.fold_in(rng, i)
        out = generate(
            model, ids, mask, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad, rng=key,
            **sampling,
        )  # fmt: skip
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for row in range(len(chunk)):
            new = tokens[row, : lengths[row]].tolist()
            stopped = bool(new) and new[-1] in stops
            text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
            replies.append(Reply(text=text.strip(), stopped=stopped, num_tokens=len(new)))
    return replies


def split_prompt(messages: Sequence[Mapping[str, str]]) -> tuple[list[dict], str]:
    """(turns before the last assistant turn, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m) for m in messages[:last]], messages[last]["content"]


def exact_match_eval(
    model: nnx.Module,
    tokenizer: Any,
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    max_examples: int = 0,
    num_samples: int = 20,
) -> dict:
    """Exact match of greedy replies against references over a split.

    Args:
      model, tokenizer: the chat model.
      source: records with ``messages`` and optionally ``answer`` and ``family``.
      batch_size, max_new_tokens: decoding settings.
      max_examples: evaluate only the first N records (0 = all).
      num_samples: how many (prompt, reference, reply) triples to include.

    Returns:
      ``exact_match`` (fraction), ``stopped`` (fraction of replies that ended with an
      end-of-turn / EOS token), ``mean_reply_tokens``, ``num_examples``, per-family exact match
      (``exact_match_by_family``) when records have ``family``, and ``samples``.
    """
    n = len(source) if not max_examples else min(max_examples, len(source))
    if n == 0:
        raise ValueError("exact match over an empty split: it has no records to generate for")
    records = [source[i] for i in range(n)]
    turns = [split_prompt(chat.validate_messages(r["messages"], where=f"record {i}"))
             for i, r in enumerate(records)]  # fmt: skip
    refs = [r.get("answer") or reference for r, (_, reference) in zip(records, turns)]
    prompts = [prompt_ids(tokenizer, p) for p, _ in turns]
    replies = generate_replies(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    hits = [exact_match(r.text, ref) for r, ref in zip(replies, refs)]
    by_family: dict[str, list[bool]] = collections.defaultdict(list)
    for rec, hit in zip(records, hits):
        if rec.get("family"):
            by_family[str(rec["family"])].append(hit)
    return {
        "exact_match": float(np.mean(hits)),
        "stopped": float(np.mean([r.stopped for r in replies])),
        "mean_reply_tokens": float(np.mean([r.num_tokens for r in replies])),
        "num_examples": n,
        "exact_match_by_family": {k: float(np.mean(v)) for k, v in sorted(by_family.items())},
        "samples": [
            {"prompt": turns[i][0][-1]["content"], "reference": refs[i], "reply": replies[i].text}
            for i in range(min(num_samples, n))
        ],
    }
