"""Next-token cross-entropy of a causal LM, whole or in sequence chunks.

The LM head's float32 logits are the largest activation of a small decoder with a large
vocabulary (SmolLM2-135M, 4 x 1024 tokens: 4 x 1024 x 49,152 floats = 805 MB, kept for the
backward pass with their gradient). With ``loss_chunk`` > 0 the task computes the loss from the
final hidden states ``chunk`` positions at a time (``chunked_loss_sums``): only one chunk's
logits exist at a time, and under differentiation each chunk's gradient with respect to the
head's parameters and the hidden states is computed right there, in the forward pass (a fused
linear cross-entropy), so nothing is recomputed in the backward pass. The result is the same
function (float32 sums in another order).

``loss_chunk`` is a runtime choice like the attention kernel (config ``runtime.loss_chunk``,
``set_loss_chunk`` / ``loss_chunk_scope``), read when the step is traced; models that expose
``hidden_states`` and ``lm_head_fn`` (Llama family, GPT-2) use it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sft_jax.models.trace_setting import TraceSetting

Array = jax.Array


def _checked(chunk: int) -> int:
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"runtime.loss_chunk={chunk!r}; use 0 (whole sequence) or a positive int")
    return chunk


_LOSS_CHUNK = TraceSetting("loss_chunk", 0, _checked)


def set_loss_chunk(chunk: int) -> None:
    """Sets the chunk length (positions; 0 = whole sequence) for the rest of the context."""
    _LOSS_CHUNK.set(chunk)


def loss_chunk_scope(chunk: int) -> contextlib.AbstractContextManager[None]:
    """Uses chunk length ``chunk`` for steps traced inside the block."""
    return _LOSS_CHUNK.scope(chunk)


def loss_chunk() -> int:
    """The current chunk length (0 = whole sequence)."""
    return _LOSS_CHUNK.get()


def token_stats(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token cross-entropy and argmax hits: logits [..., V] (any float dtype, computed in
    float32), int targets [...] -> (losses, hits), both float32 [...]."""
    return cross_entropy(logits, targets), _hits(logits, targets)


def weighted_sums(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """``sum(weights * losses)`` and ``sum(weights * hits)`` of ``token_stats`` (the
    whole-sequence counterpart of ``chunked_loss_sums``)."""
    losses, hits = token_stats(logits, targets)
    return jnp.sum(losses * weights), jnp.sum(hits * weights)


def _hits(logits: Array, targets: Array) -> Array:
    """1.0 where the argmax of ``logits`` [..., V] is the target, float32 [...]."""
    return (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


@jax.custom_vjp
def cross_entropy(logits: Array, targets: Array) -> Array:
    """``logsumexp(logits) - logits[target]`` per token, float32 [...], of logits [..., V] in
    any float dtype (computed in float32).

    Its VJP writes the logits' gradient straight in their dtype, ``g * (softmax - onehot)``
    computed in float32 in one elementwise pass (``xent_grad``). Autodiff of the float32 form
    instead writes a float32 gradient, scatters the one-hot into it and converts it to the
    logits' bfloat16: three passes over the [B, T, V] array, which for a small LM with a large
    vocabulary is the largest of its step (README "Speed"). Only the logits and the [...]
    log-normalizers are kept for the backward pass. Being a ``custom_vjp``, it has
    reverse-mode derivatives only (no ``jax.jvp``).
    """
    return _xent_fwd(logits, targets)[0]


def _vocab_index(targets: Array, vocab: int) -> Array:
    """int32 targets, negative ones counted from the end as indexing does (``take_along_axis``
    in the loss and the one-hot comparison in its gradient then pick the same entry)."""
    targets = targets.astype(jnp.int32)
    return jnp.where(targets < 0, targets + vocab, targets)


def _xent_fwd(logits: Array, targets: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    targets = _vocab_index(targets, logits.shape[-1])
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked.astype(jnp.float32), (logits, targets, lse)


def _xent_bwd(res: tuple[Array, Array, Array], g: Array) -> tuple[Array, None]:
    logits, targets, lse = res
    return xent_grad(logits, targets, lse, g), None  # integer targets: no cotangent


def xent_grad(logits: Array, targets: Array, lse: Array, g: Array) -> Array:
    """``g[..., None] * (softmax(logits) - onehot(targets))`` in the logits' dtype, computed in
    float32 from the log-normalizers ``lse`` [...] (one elementwise pass; the one-hot is a
    comparison with the vocabulary index, not a scatter)."""
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    targets = _vocab_index(targets, logits.shape[-1])
    onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    return ((probs - onehot) * g[..., None]).astype(logits.dtype)


cross_entropy.defvjp(_xent_fwd, _xent_bwd)


def _head_grad(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array, Array]:
    """Per-token cross-entropy, argmax hits and the gradient of ``sum(weights * losses)`` with
    respect to the logits (in their dtype; ``xent_grad``)."""
    losses, (_, _, lse) = _xent_fwd(logits, targets)
    return losses, _hits(logits, targets), xent_grad(logits, targets, lse, weights)


def _chunked(x: Array, n: int, chunk: int) -> Array:
    """[B, T, ...] -> [n, B, chunk, ...], T padded with zeros to n * chunk."""
    pad = [(0, 0), (0, n * chunk - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad)
    return x.reshape((x.shape[0], n, chunk) + x.shape[2:]).swapaxes(0, 1)


def _unchunked(x: Array, t: int) -> Array:
    """[n, B, chunk, ...] -> [B, t, ...] (the padding dropped)."""
    x = x.swapaxes(0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :t]


def _scan_chunks(head, params, hidden, targets, weights, chunk: int, grads: bool):
    """The chunk loop behind ``chunked_loss_sums``: per-token losses and hits [B, T], and with
    ``grads`` the gradient of ``sum(weights * losses)`` with respect to ``params`` (float32,
    summed over chunks) and ``hidden`` ([B, T, H], its dtype)."""
    t = targets.shape[1]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    xs = tuple(_chunked(x, n, chunk) for x in (hidden, targets, weights))

    def stats(carry, x):
        h_c, y_c, _ = x
        losses, hits = token_stats(head(params, h_c), y_c)
        return carry, (losses, hits)

    def stats_and_grads(acc, x):
        h_c, y_c, w_c = x
        logits, vjp = jax.vjp(head, params, h_c)
        losses, hits, g = _head_grad(logits, y_c, w_c)
        d_params, d_h = vjp(g)
        acc = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc, d_params)
        return acc, (losses, hits, d_h)

    if not grads:
        _, out = jax.lax.scan(stats, None, xs)
        return tuple(_unchunked(o, t) for o in out), None
    acc0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    d_params, (losses, hits, d_h) = jax.lax.scan(stats_and_grads, acc0, xs)
    return (_unchunked(losses, t), _unchunked(hits, t)), (d_params, _unchunked(d_h, t))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def chunked_loss_sums(
    head: Callable[[Any, Array], Array],
    params: Any,
    hidden: Array,
    targets: Array,
    weights: Array,
    chunk: int,
) -> tuple[Array, Array]:
    """``sum(weights * losses)`` and ``sum(weights * hits)`` of ``head(params, hidden)``'s
    cross-entropy against ``targets``, computed ``chunk`` positions at a time.

    Under differentiation each chunk's logits exist only inside its loop iteration: the forward
    pass computes the chunk's gradient with respect to the head's parameters and the hidden
    states at once (the loss is a sum, so its cotangent is one scalar that the backward pass
    multiplies in). No logits are kept for the backward pass and none are recomputed: the same
    three head matmuls per token as the whole-sequence loss.

    Args:
        head: Pure LM head, ``(params, [B, c, H]) -> logits [B, c, V]`` (any float dtype; the
            loss is computed in float32, the logits' gradient comes back in their dtype).
        params: Its parameters (a pytree; gradients are accumulated in float32).
        hidden: Final hidden states [B, T, H].
        targets: int [B, T].
        weights: float32 [B, T] per-token loss weights (the target mask).
        chunk: Positions per chunk (> 0; at most T is used); T is padded up to a multiple of
            it, with zero weight.

    Returns:
        (loss_sum, correct), float32 scalars.
    """
    (losses, hits), _ = _scan_chunks(head, params, hidden, targets, weights, chunk, False)
    return jnp.sum(losses * weights), jnp.sum(hits * weights)


def _sums_fwd(head, params, hidden, targets, weights, chunk):
    (losses, hits), (d_params, d_h) = _scan_chunks(
        head, params, hidden, targets, weights, chunk, True
    )
    sums = (jnp.sum(losses * weights), jnp.sum(hits * weights))
    d_params = jax.tree.map(lambda d, p: d.astype(p.dtype), d_params, params)
    return sums, (d_params, d_h, losses, hits)


def _sums_bwd(head, chunk, residuals, cotangents):
    del head, chunk
    d_params, d_h, losses, hits = residuals
    g_loss, g_correct = cotangents  # the hits are piecewise constant in params and hidden
    d_params = jax.tree.map(lambda d: (d * g_loss).astype(d.dtype), d_params)
    d_weights = g_loss * losses + g_correct * hits
    return d_params, (d_h * g_loss).astype(d_h.dtype), None, d_weights


chunked_loss_sums.defvjp(_sums_fwd, _sums_bwd)
