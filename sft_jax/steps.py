"""Pure train and eval steps, jitted once with explicit shardings and a donated state.

``train_step(state, batch) -> (state, metrics)``: merges the graph with the params, computes the
task loss (summed over real examples), differentiates only the trainable leaves, accumulates over
``accumulation_steps`` micro-batches with ``lax.scan``, and applies the optax update. Metrics are
global-batch means plus gradient / parameter / update norms (as big_vision's ``update_fn``),
``nonfinite``: 1 when the update was skipped because the loss or a gradient was NaN/Inf (the
step still counts, the state keeps its last good parameters and optimizer moments; the
learning-rate schedule moves on with the step), and ``units``: the real tokens (images) of the
global batch, int32, what the trainer's throughput counts (``tasks.batch_units``).

Two ways to run it on several devices, both exact (the loss is normalized by the global batch):
``make_train_step`` jits it over a ``(data, fsdp, tensor)`` mesh with sharded state and batch;
``make_pmap_train_step`` runs it per device under ``jax.pmap`` on a ``[D, B/D, ...]`` batch with a
replicated state, ``lax.psum``-ing the target weight, gradients and stats over the device axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sft_jax import loss_scale, optimizers, tasks, tree_util
from sft_jax.models import activation_sharding, conv
from sft_jax.sharding import PMAP_AXIS, replicated
from sft_jax.train_state import StepSetup, TrainState


def _split(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): the same tree twice, with None where the other half lives."""
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def _join(trainable: Any, frozen: Any) -> Any:
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def _without_stats(params: Any, stats: Any | None) -> Any:
    """``params`` with BatchNorm statistics zeroed (for norms of the learned weights only)."""
    if stats is None:
        return params
    return jax.tree.map(lambda p, m: jnp.zeros((), p.dtype) if m else p, params, stats)


def _micro_batches(batch: dict, n: int, sharding: NamedSharding | None = None) -> dict:
    """[B, ...] -> [n, B/n, ...] for scanning over micro-batches; micro-batch i holds rows
    i, i + n, i + 2n, ...

    Strided rather than contiguous, so that on a data-parallel mesh (``sharding``: the batch's,
    leading axis over the devices) each device's contiguous block of rows splits into its own
    share of every micro-batch, and no row moves between devices (contiguous micro-batches would
    each live on a fraction of the devices: XLA all-gathers the batch). Any split gives the same
    summed gradient."""

    def reshape(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} not divisible by accumulation_steps={n}")
        micro = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        if sharding is None:
            return micro
        spec = PartitionSpec(None, *sharding.spec)
        return jax.lax.with_sharding_constraint(micro, NamedSharding(sharding.mesh, spec))

    return jax.tree.map(reshape, batch)


def _psum(tree: Any, axis_name: str | None) -> Any:
    """Sums ``tree`` over the pmap axis ``axis_name``; unchanged when it is None."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _batch_stats(model: Any) -> dict:
    """The model's BatchNorm running statistics as a pure dict (only those leaves)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _replace_stats(tree: Any, batch_stats: dict | None) -> Any:
    """``tree`` (params-shaped, possibly with None holes) with its BatchNorm statistics replaced
    by ``batch_stats``; unchanged when that is None."""
    if batch_stats is None:
        return tree
    flat = tree_util.flatten_to_dict(batch_stats)
    return tree_util.map_with_path_str(lambda path, x: flat.get(path, x), tree)


def _grads_and_stats(
    setup: StepSetup,
    task: Any,
    params: Any,
    batch: dict,
    rng: jax.Array,
    accumulation_steps: int,
    axis_name: str | None = None,
    scale: jax.Array | None = None,
) -> tuple[Any, dict, dict | None]:
    """Gradient of the global-batch mean loss w.r.t. trainable params, summed stats, and the
    BatchNorm running statistics after the forward passes (None for models without BatchNorm).

    Under pmap (``axis_name`` set) ``batch`` is this device's slice: the target weight is summed
    over devices before dividing, and the per-device gradients and stats are summed after, so the
    result is the global-batch gradient on every device; BatchNorm layers average their batch
    statistics over the devices (``conv.batch_axis_scope``), so they normalize, and update
    their running statistics, as over the global batch. With accumulation, each micro-batch's
    forward pass updates the running statistics the next one starts from (as consecutive torch
    forward passes would). With a loss ``scale`` (float16 compute, ``sft_jax.loss_scale``) the
    loss is differentiated times the scale and the gradients divided by it.
    """
    trainable, frozen = _split(params, setup.trainable)
    total_w = jnp.maximum(_psum(task.total_weight(batch), axis_name), 1.0)
    has_stats = setup.stats is not None
    # Under jit the hidden states between blocks keep the batch's layout; pmap has no mesh.
    layout = None if axis_name else setup.batch_sharding

    def loss_fn(t, f, mb, key):
        model = nnx.merge(setup.graphdef, _join(t, f))
        # BatchNorm over the global batch under pmap; block boundaries in the batch's layout.
        with conv.batch_axis_scope(axis_name), activation_sharding.scope(layout):
            loss_sum, stats = task.loss_sums(model, mb, key)
        loss = loss_sum / total_w
        scaled = loss if scale is None else loss * scale
        return scaled, (stats, _batch_stats(model) if has_stats else None)

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accumulation_steps == 1:
        grads, (stats, bn) = grad_fn(trainable, frozen, batch, rng)
    else:
        # Under pmap ``batch`` is this device's slice already; under jit, keep rows in place.
        micro = _micro_batches(
            batch, accumulation_steps, None if axis_name else setup.batch_sharding
        )

        def body(carry, xs):
            g_acc, st_acc, f = carry
            mb, i = xs
            g, (st, bn) = grad_fn(trainable, f, mb, jax.random.fold_in(rng, i))
            acc = jax.tree.map(jnp.add, (g_acc, st_acc), (g, st))
            return (*acc, _replace_stats(f, bn)), bn

        shapes = jax.eval_shape(
            grad_fn, trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1][0]))
        (grads, stats, _), bns = jax.lax.scan(
            body, (*zeros, frozen), (micro, jnp.arange(accumulation_steps))
        )
        bn = None if bns is None else jax.tree.map(lambda x: x[-1], bns)
    grads, stats = _psum((grads, stats), axis_name)
    if scale is not None:
        grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
    return grads, stats, bn


def train_step(
    setup: StepSetup,
    task: Any,
    accumulation_steps: int,
    state: TrainState,
    batch: dict,
    axis_name: str | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch. Pure; jit it with ``make_train_step``.

    With ``axis_name`` (under ``jax.pmap``, see ``make_pmap_train_step``) ``batch`` is one
    device's slice and every reduction over the batch is summed over that axis: the update, the
    metrics and the ``nonfinite`` flag come out identical on every device. Each device draws its
    own dropout masks (the step key is folded with the device index).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    scale = loss_scale.current(state.opt_state)  # float16 compute only; None otherwise
    grads, stats, batch_stats = _grads_and_stats(
        setup, task, state.params, batch, rng, accumulation_steps, axis_name, scale
    )
    # Frozen leaves: zero gradients (optax.set_to_zero ignores them; XLA folds the zeros away).
    full_grads = jax.tree.map(
        lambda g, p: jnp.zeros_like(p) if g is None else g,
        grads,
        state.params,
        is_leaf=lambda x: x is None,
    )
    w = jnp.maximum(stats["weight"], 1.0)
    loss, grad_norm = stats["loss_sum"] / w, optax.tree.norm(grads)
    # A NaN/Inf loss or gradient skips the update: the step (and so the data position)
    # advances, parameters and optimizer state stay the last good ones. The decision is known
    # before the update, so XLA fuses each select into the fusion computing that new leaf
    # (one pass over the donated state, updated in place); a decision that waited for the new
    # parameters' norm took a second pass over parameters and optimizer state. A `lax.cond`
    # would cost the same on CPU and block the host on GPU (XLA copies its predicate to the host).
    # Under pmap the loss and gradients are already summed over devices (a NaN on one device
    # reaches all), so every device takes the same decision.
    finite = jnp.isfinite(loss + grad_norm)

    updates, new_opt_state = setup.tx.update(full_grads, state.opt_state, state.params)
    new_params = _replace_stats(optax.apply_updates(state.params, updates), batch_stats)
    keep = functools.partial(jnp.where, finite)
    params = jax.tree.map(keep, new_params, state.params)
    # Schedule and gate counters advance anyway (``optimizers.clock_mask``).
    opt_state = jax.tree.map(
        lambda clock, n, o: n if clock else keep(n, o),
        optimizers.clock_mask(state.opt_state),
        new_opt_state,
        state.opt_state,
    )
    update_norm = jnp.where(finite, optax.tree.norm(updates), 0.0)
    metrics = {
        "loss": loss,
        "accuracy": stats["correct"] / w,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(_without_stats(params, setup.stats)),
        "update_norm": update_norm,
        "learning_rate": setup.lr_schedule(state.step),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        # What throughput counts (real tokens or images) in the global batch, counted where the
        # whole batch is: no host of a multi-process run holds it.
        "units": _psum(tasks.batch_units(batch)[1].astype(jnp.int32), axis_name),
    }
    if scale is not None:
        metrics["loss_scale"] = scale
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_train_step(
    setup: StepSetup, task: Any, accumulation_steps: int = 1
) -> Callable[[TrainState, dict], tuple]:
    """``jit(train_step)`` with the state donated and explicit in/out shardings."""
    repl = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    fn = functools.partial(train_step, setup, task, accumulation_steps)
    return jax.jit(
        fn,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, repl),
        donate_argnums=0,
    )


def make_pmap_train_step(
    setup: StepSetup,
    task: Any,
    accumulation_steps: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Callable[[TrainState, dict], tuple]:
    """``pmap(train_step)`` over ``devices``, reducing over the ``PMAP_AXIS`` device axis.

    The alternative to ``make_train_step``'s sharded jit: the state is replicated (one full copy
    per device, ``sharding.replicate``) and the batch is ``[D, B/D, ...]``
    (``sharding.pmap_batch``); ``setup``'s mesh and shardings are not used. The state is donated.
    Returns ``(state, metrics)`` with a leading device axis on every leaf, identical across
    devices (``sharding.unreplicate`` takes one copy).

    Args:
        setup: Static step parts (graph definition, optimizer, trainable mask, schedule).
        task: The task (loss) object.
        accumulation_steps: Micro-batches per device; must divide B/D.
        devices: The devices to map over, as given to ``sharding.replicate`` (default: the
            first D local devices, D being the batch's leading size).
    """
    fn = functools.partial(train_step, setup, task, accumulation_steps, axis_name=PMAP_AXIS)
    return jax.pmap(fn, axis_name=PMAP_AXIS, devices=devices, donate_argnums=0)


def make_eval_step(
    graphdef: nnx.GraphDef, task: Any, param_shardings: Any, batch_sharding: Any
) -> Callable[[Any, dict], dict]:
    """``jit(params, batch) -> per-example outputs`` (predictions, loss sums), replicated on
    every device, so that each process of a multi-host run can read them whole."""

    def eval_step(params, batch):
        with activation_sharding.scope(batch_sharding):
            return task.eval_outputs(nnx.merge(graphdef, params), batch)

    return jax.jit(
        eval_step,
        in_shardings=(param_shardings, batch_sharding),
        out_shardings=replicated(batch_sharding.mesh),
    )
