"""Functional dropout: applied iff a PRNG key is passed, so modules store no RNG state and the
only Variables in a model are ``nnx.Param``.

Layers whose call sites pass no key (LoRA adapters inside ``Dense`` slots) read an ambient one:
``dropout_scope(rng)`` sets it for the duration of a model call and ``scoped_rng(salt)`` derives
a per-layer key from it. ``dropout_implementation`` / ``set_dropout`` choose how masks are drawn
(threefry bits or a cheaper counter hash).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sft_jax.models import trace_setting

Array = jax.Array


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; identity when ``rng`` is None or ``rate`` is 0.

    Args:
        x: Any array.
        rate: Probability of zeroing an element.
        rng: PRNG key, or None for inference.

    Returns:
        ``x`` with elements dropped and the rest scaled by ``1 / (1 - rate)``.
    """
    if rng is None or rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    if _IMPLEMENTATION.get() == "hash":
        keep = hashed_keep_mask(rng, 1.0 - rate, x.shape)
    else:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


DROPOUT_IMPLEMENTATIONS = ("threefry", "hash")
_IMPLEMENTATION = trace_setting.choice("dropout", DROPOUT_IMPLEMENTATIONS, "threefry")


def dropout_implementation(name: str) -> contextlib.AbstractContextManager[None]:
    """Selects how dropout masks are drawn in models traced inside the block.

    ``"threefry"`` (default): ``jax.random.bernoulli`` with the key. ``"hash"``: a
    counter-based integer hash of each element's index and a seed drawn from the key
    (``hashed_keep_mask``), about 8x cheaper on CPU, where mask generation is a large part of a
    BERT step. Both are deterministic functions of the key; they draw different masks. Like
    ``attention_implementation``, the choice is read when a function is traced.
    """
    return _IMPLEMENTATION.scope(name)


def set_dropout(name: str) -> None:
    """Sets the dropout-mask implementation for the rest of the current context (the process's
    main thread for the command-line entry points), as ``dropout_implementation`` does for a
    block."""
    _IMPLEMENTATION.set(name)


def _fmix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finalizer: a bijection that mixes every input bit into every output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hashed_keep_mask(rng: Array, keep_prob: float, shape: Sequence[int]) -> Array:
    """Bool mask, True with probability ``keep_prob`` per element: ``fmix32((index * golden) ^
    seed) < keep_prob * 2**32`` with a 32-bit seed drawn from ``rng`` (element indices count the
    flattened array, so masks do not depend on how the array is sharded)."""
    seed = jax.random.bits(rng, (), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = _fmix32((index * jnp.uint32(0x9E3779B1)) ^ seed)
    return h < jnp.uint32(min(int(keep_prob * 2**32), 2**32 - 1))


def split_rng(rng: Array | None, num: int) -> list[Array | None]:
    """Splits a dropout key into ``num`` keys, or returns ``num`` Nones when ``rng`` is None."""
    if rng is None:
        return [None] * num
    return list(jax.random.split(rng, num))


# The ambient dropout key (already folded with _SCOPE_STREAM), or None outside a training call.
_SCOPED_KEY: trace_setting.TraceSetting[Array | None] = trace_setting.TraceSetting(
    "sft_jax_scoped_dropout_key", None
)
# Separates scoped keys from the fold_in(rng, i) / split(rng) keys that models derive themselves.
_SCOPE_STREAM = 0x5C0E


def dropout_scope(rng: Array | None) -> contextlib.AbstractContextManager[None]:
    """Makes ``rng`` the ambient dropout key while the block runs (None: no dropout).

    For layers whose callers pass no key (e.g. a LoRA adapter behind a ``Dense`` call site). The
    tasks wrap every model call in it with the step's dropout key. It is plain Python state read
    while tracing, so it works under ``jit``/``grad``/``scan`` as long as the scope is opened
    inside the traced function (as the tasks do). Blocks recomputed in the backward pass
    (``remat``) see the key their forward pass saw, although the scope has closed by then.

    Args:
        rng: PRNG key, or None for inference (``scoped_rng`` then returns None).
    """
    key = None if rng is None else jax.random.fold_in(rng, _SCOPE_STREAM)
    return _SCOPED_KEY.scope(key)


def scoped_rng(salt: int) -> Array | None:
    """The ambient dropout key folded with ``salt`` (one fixed salt per layer), or None."""
    key = _SCOPED_KEY.get()
    return None if key is None else jax.random.fold_in(key, salt)
