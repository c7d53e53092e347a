"""Batched autoregressive decoding for the causal LMs: KV cache, greedy / temperature / top-k /
top-p sampling, stop tokens.

The cached path is one jitted function with static shapes: prefill the [B, T] prompt into a
cache of T + N slots, then a ``lax.while_loop`` of one-token steps that ends after N tokens or
when every row has emitted a stop token. Prompts may be left- or right-padded (positions count
real tokens, see ``layers.causal_lm_inputs``). ``generate_without_cache`` recomputes the full
forward every step: the slow reference the cached path is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models.decoder import KVCache

Array = jax.Array


class Generation(NamedTuple):
    """New tokens [B, N] int32 (stop token included, then ``pad_id``) and lengths [B] int32
    (tokens up to and including the first stop token, else N)."""

    tokens: Array
    lengths: Array


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything static about one decoding call (hashable: a jit static argument)."""

    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int
    temperature: float
    top_k: int
    top_p: float


def init_cache(model: nnx.Module, batch: int, max_len: int) -> KVCache:
    """An empty KV cache of ``max_len`` slots for ``batch`` rows of ``model``."""
    return model.init_cache(batch, max_len)


def sample_logits(
    logits: Array,
    rng: Array | None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """Picks one token per row from logits [B, V] -> int32 [B].

    Args:
        logits: Next-token logits.
        rng: PRNG key (unused when greedy).
        temperature: 0 is greedy (argmax); otherwise logits are divided by it and sampled.
        top_k: Keep only the k most likely tokens (0 = all; more than V means all, as in
            transformers).
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        k = min(top_k, logits.shape[-1])  # lax.top_k fails on k > V
        kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)  # [B, V], most likely first
        probs = jax.nn.softmax(desc, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before it is < top_p
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _last_real(logits: Array, mask: Array) -> Array:
    """Logits [B, T, V] at each row's last real position -> [B, V]."""
    t = mask.shape[1]
    last = jnp.argmax(jnp.where(mask.astype(bool), jnp.arange(t), -1), axis=1)  # [B]
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def _emit(step, logits, tokens, lengths, finished, rng, s: _Settings):
    """Samples step ``step``'s token and records it; returns the token and updated state."""
    rng, key = jax.random.split(rng)
    tok = sample_logits(logits, key, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    tok = jnp.where(finished, s.pad_id, tok)  # finished rows emit padding
    tokens = tokens.at[:, step].set(tok)
    lengths = lengths + (~finished).astype(jnp.int32)
    finished = finished | jnp.isin(tok, jnp.asarray(s.stop_ids or (-1,), jnp.int32))
    return tok, tokens, lengths, finished, rng


@functools.partial(jax.jit, static_argnames=("graphdef", "s"))
def _generate_cached(graphdef, state, prompt_ids, prompt_mask, rng, s: _Settings) -> Generation:
    model = nnx.merge(graphdef, state)
    b, t = prompt_ids.shape
    n = s.max_new_tokens
    logits, cache = model(prompt_ids, prompt_mask, cache=model.init_cache(b, t + n))  # prefill
    tokens = jnp.full((b, n), s.pad_id, jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)
    carry = (0, _last_real(logits, prompt_mask), cache, tokens, zeros, zeros.astype(bool), rng)

    def cond(c):
        return (c[0] < n) & ~jnp.all(c[5])

    def body(c):
        step, logits, cache, tokens, lengths, finished, rng = c
        tok, tokens, lengths, finished, rng = _emit(step, logits, tokens, lengths, finished, rng, s)
        logits, cache = model(tok[:, None], jnp.ones((b, 1), jnp.int32), cache=cache)
        return step + 1, logits[:, -1], cache, tokens, lengths, finished, rng

    _, _, _, tokens, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens, lengths)


def position_limit(model: nnx.Module) -> int | None:
    """Most tokens (prompt buffer + new) one sequence may hold: the size of a learned position
    table (GPT-2's ``n_positions``), None for rotary models."""
    return getattr(getattr(model, "config", None), "n_positions", None)


def _check_length(model: nnx.Module, prompt_len: int, max_new_tokens: int) -> None:
    """Learned position tables (GPT-2's ``n_positions``) cannot go past their size."""
    limit = position_limit(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{limit} learned positions"
        )


def _check_prompt_ids(model: nnx.Module, ids: Array, mask: Array) -> None:
    """On the host: every real prompt token (mask 1) must be a row of the embedding table.

    An id outside it would be clipped to a wrong row (``layers.Embed``) and decode garbage
    silently. Masked padding may hold any id.
    """
    vocab = getattr(model.config, "vocab_size", None)
    ids, real = np.asarray(ids), np.asarray(mask).astype(bool)
    outside = ids < 0 if vocab is None else (ids < 0) | (ids >= vocab)
    bad = real & outside
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"prompt_ids[{row}, {col}] = {int(ids[row, col])} is not a token id of this model "
            f"(vocab_size={vocab}); {int(bad.sum())} real prompt token(s) are out of range"
        )


def _settings(model, max_new_tokens, stop_ids, temperature, top_k, top_p, pad_id, rng):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"bad sampling settings: {temperature=}, {top_k=}, {top_p=}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    if isinstance(stop_ids, (int, np.integer)):  # one id, as transformers' eos_token_id allows
        stop_ids = (stop_ids,)
    stops = tuple(sorted({int(i) for i in stop_ids}))
    return _Settings(
        int(max_new_tokens), stops, int(pad_id), float(temperature), int(top_k), float(top_p)
    )


def generate(
    model: nnx.Module,
    prompt_ids: Array,
    prompt_mask: Array | None = None,
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int] | int = (),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: Array | None = None,
    pad_id: int | None = None,
) -> Generation:
    """Decodes up to ``max_new_tokens`` for each prompt row with a KV cache (one jitted call).

    Compiles once per (model structure, prompt shape, settings); pad prompts to a few fixed
    lengths to avoid recompiling.

    Args:
        model: A causal LM with ``init_cache`` and the ``cache=`` calling convention.
        prompt_ids: int [B, T], left- (preferred) or right-padded.
        prompt_mask: [B, T] 1 for real prompt tokens (None: all real).
        max_new_tokens: N.
        stop_ids: Token ids (or one id) that end a row (emitted, then padding follows).
        temperature: 0 for greedy; > 0 samples (needs ``rng``).
        top_k: Sample among the k most likely tokens (0 = all).
        top_p: Nucleus sampling mass (1 = off).
        rng: PRNG key for sampling; the same key gives the same tokens.
        pad_id: Emitted after a stop token (default the config's ``pad_token_id``, else 0).

    Returns:
        ``Generation(tokens [B, N], lengths [B])``.

    Raises:
        ValueError: Bad settings, a prompt too long for learned positions, or a real prompt
            token that is not below the model's ``vocab_size`` (its position and id named).
    """
    s = _settings(model, max_new_tokens, stop_ids, temperature, top_k, top_p, pad_id, rng)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    _check_length(model, prompt_ids.shape[1], s.max_new_tokens)
    mask = jnp.ones_like(prompt_ids) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    _check_prompt_ids(model, prompt_ids, mask)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return _generate_cached(graphdef, state, prompt_ids, mask, rng, s)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_logits(graphdef, state, ids: Array, mask: Array) -> Array:
    """Full forward over the whole buffer; logits at each row's last real token [B, V]."""
    return _last_real(nnx.merge(graphdef, state)(ids, mask), mask)


def generate_without_cache(
    model: nnx.Module, prompt_ids: Array, prompt_mask: Array | None = None, **kwargs: Any
) -> Generation:
    """``generate`` without a cache: every step re-runs the model on the whole [B, T + N]
    buffer (static shape, one compilation). Same arguments, same results; for testing."""
    defaults = dict(stop_ids=(), temperature=0.0, top_k=0, top_p=1.0, pad_id=None, rng=None)
    s = _settings(model, **{**defaults, **kwargs})
    ids = jnp.asarray(prompt_ids, jnp.int32)
    b, t = ids.shape
    _check_length(model, t, s.max_new_tokens)
    mask = jnp.ones_like(ids) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    _check_prompt_ids(model, ids, mask)
    ids = jnp.pad(ids, ((0, 0), (0, s.max_new_tokens)), constant_values=s.pad_id)
    mask = jnp.pad(mask, ((0, 0), (0, s.max_new_tokens)))
    graphdef, state = nnx.split(model)
    tokens = jnp.full((b, s.max_new_tokens), s.pad_id, jnp.int32)
    lengths, finished = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
    rng = jax.random.key(0) if kwargs.get("rng") is None else kwargs["rng"]
    for step in range(s.max_new_tokens):
        logits = _next_logits(graphdef, state, ids, mask)
        tok, tokens, lengths, finished, rng = _emit(step, logits, tokens, lengths, finished, rng, s)
        ids, mask = ids.at[:, t + step].set(tok), mask.at[:, t + step].set(1)
        if bool(finished.all()):
            break
    return Generation(tokens, lengths)
