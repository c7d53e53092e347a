"""Next-token cross-entropy of a causal LM, whole or in sequence chunks.

The LM head's float32 logits are the largest activation of a small decoder with a large
vocabulary (SmolLM2-135M, 4 x 1024 tokens: 4 x 1024 x 49,152 floats = 805 MB, kept for the
backward pass with their gradient). With ``loss_chunk`` > 0 the task computes the loss from the
final hidden states ``chunk`` positions at a time under ``jax.checkpoint`` inside a ``scan``:
only one chunk's logits exist at a time, in both passes, and the backward pass recomputes them.
The result is the same function (float32 sums in another order), at the price of computing the
head's matmul twice.

``loss_chunk`` is a runtime choice like the attention kernel (config ``runtime.loss_chunk``,
``set_loss_chunk`` / ``loss_chunk_scope``), read when the step is traced; models that expose
``hidden_states`` and ``lm_logits`` (Llama family, GPT-2) use it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
_LOSS_CHUNK: contextvars.ContextVar[int] = contextvars.ContextVar("loss_chunk", default=0)


def _checked(chunk: int) -> int:
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"runtime.loss_chunk={chunk!r}; use 0 (whole sequence) or a positive int")
    return chunk


def set_loss_chunk(chunk: int) -> None:
    """Sets the chunk length (positions; 0 = whole sequence) for the rest of the context."""
    _LOSS_CHUNK.set(_checked(chunk))


@contextlib.contextmanager
def loss_chunk_scope(chunk: int) -> Iterator[None]:
    """Uses chunk length ``chunk`` for steps traced inside the block."""
    token = _LOSS_CHUNK.set(_checked(chunk))
    try:
        yield
    finally:
        _LOSS_CHUNK.reset(token)


def loss_chunk() -> int:
    """The current chunk length (0 = whole sequence)."""
    return _LOSS_CHUNK.get()


def token_stats(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token cross-entropy and argmax hits: logits [..., V] (any float dtype, computed in
    float32), int targets [...] -> (losses, hits), both float32 [...]."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return losses, hits


def chunked_token_stats(
    lm_logits: Callable[[Array], Array], hidden: Array, targets: Array, chunk: int
) -> tuple[Array, Array]:
    """``token_stats(lm_logits(hidden), targets)`` computed ``chunk`` positions at a time.

    Args:
        lm_logits: The LM head, [B, c, H] -> [B, c, V].
        hidden: Final hidden states [B, T, H].
        targets: int [B, T].
        chunk: Positions per chunk (> 0; at most T is used); T is padded up to a multiple of
            it and the padding's results dropped.

    Returns:
        (losses, hits), float32 [B, T].
    """
    b, t = targets.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, hidden.shape[-1])
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk)

    @jax.checkpoint
    def one(h_c: Array, y_c: Array) -> tuple[Array, Array]:
        return token_stats(lm_logits(h_c), y_c)

    def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, tuple[Array, Array]]:
        return carry, one(*xs)

    _, (losses, hits) = jax.lax.scan(body, None, (h.swapaxes(0, 1), y.swapaxes(0, 1)))

    def back(a: Array) -> Array:  # [n, B, c] -> [B, T]
        return a.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

    return back(losses), back(hits)
