"""Activation rematerialization (gradient checkpointing) of a model's blocks.

``runtime.remat`` says what the backward pass keeps of each block's forward pass:

    none   every intermediate the gradient needs (default; no recomputation)
    full   only the block's inputs: the backward pass runs the block's forward pass again
           (about one more forward pass of the blocks, a third more model FLOPs) and
           differentiates it, so a block's activations exist for one block at a time

Both compute the same loss, gradients and BatchNorm running statistics (the recomputation
repeats the same operations, under the settings the forward pass saw). It applies to the blocks
of every family, each wrapped by ``apply``: the transformer blocks (BERT, the Llama family,
GPT-2, ViT), ResNet's residual layers and EfficientNet's MBConv blocks; read while a step is
traced (``trace_setting``; set with the kernel choices by ``kernel_choices.Kernels``).

Why not ``jax.checkpoint``: it recomputes from the saved inputs alone, so nothing stops the
compiler from running the recomputation early. XLA CPU does: on a 4-layer SmolLM2 step
(4 x 1024 tokens, loss in chunks of 256), ``jax.checkpoint`` left every layer's attention
probabilities live from the forward pass to the backward pass (3.4 GiB of temporary buffers;
3.5 GiB without it). Here the recomputed block reads its input plus ``0 * g[0]`` (the first
element of the block's output cotangent), a real data dependency: the recomputation cannot
start before the backward pass reaches the block, on any backend (1.3 GiB). A non-finite
``g[0]`` makes that block's gradient NaN, where the update is non-finite anyway (the trainer
skips it).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import activation_sharding, trace_setting

POLICIES = ("none", "full")
REMAT = trace_setting.choice("remat", POLICIES, "none")


def _call_block(block: nnx.Module, *args: Any) -> Any:
    return block(*args)


def apply(block: nnx.Module, *args: Any, call: Callable[..., Any] = _call_block) -> Any:
    """``call(block, *args)`` (default ``block(*args)``), recomputed in the backward pass under
    the ``full`` policy.

    The recomputation runs under the trace settings current here (``trace_setting``), which
    may hold traced values (the ambient dropout key): the gradient must be taken in the trace
    that calls this (as the train step does, also inside its accumulation scan), not outside a
    ``scan`` / ``jit`` whose body opens such a scope (jax then reports a leaked tracer). Of the
    block's variables, the call may change its ``nnx.BatchStat`` ones (BatchNorm in training);
    those are carried back to ``block``, any other change is dropped.

    Args:
        block: The block (an ``nnx.Module``; its parameters are differentiable inputs).
        *args: The block's inputs (pytrees of arrays; None allowed).
        call: Runs one block. It may close over arrays that are not differentiated (the
            rotary tables; jax refuses a closed-over value that is).
    """
    if REMAT.get() == "none":
        return call(block, *args)
    graphdef, state = nnx.split(block)
    # The backward pass is traced after the forward pass's scopes have closed (the ambient
    # dropout key, the activation layout, BatchNorm's axis): the recomputation runs in a copy
    # of the settings the forward pass saw, so it repeats the same operations.
    settings = contextvars.copy_context()

    def run(state: Any, args: tuple) -> tuple[Any, Any]:
        module = nnx.merge(graphdef, state)
        out = settings.run(call, module, *args)
        return out, nnx.state(module, nnx.BatchStat)  # as updated by BatchNorm in training

    out, running_stats = _recomputed(run, state, args)
    nnx.update(block, running_stats)
    return out


def run_encoder(blocks: Any, x: Any, *args: Any, dropout_rng: Any = None) -> Any:
    """An encoder's block stack (BERT, ViT): ``x = block(x, *args, rng)`` for each block in
    turn, through ``apply``; block ``i`` gets dropout key ``fold_in(dropout_rng, i)``. The hidden
    states between blocks keep the batch's layout (``activation_sharding``)."""
    for i, block in enumerate(blocks):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        x = apply(block, activation_sharding.constrain(x), *args, rng)
    return activation_sharding.constrain(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed(run: Callable[..., Any], state: Any, args: tuple) -> Any:
    return run(state, args)


def _forward(run: Callable[..., Any], state: Any, args: tuple) -> tuple[Any, tuple]:
    return run(state, args), (state, args)  # the inputs alone


def _backward(run: Callable[..., Any], saved: tuple, g: Any) -> tuple:
    state, args = saved
    first = next(x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.inexact))
    wait = first.reshape(-1)[0] * 0  # 0, once the cotangent exists (NaN if it is not finite)

    def after_g(x: Any) -> Any:
        floating = isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
        return x + wait.astype(x.dtype) if floating else x

    _, vjp = jax.vjp(run, state, jax.tree.map(after_g, args))
    return vjp(g)


_recomputed.defvjp(_forward, _backward)
