"""Training-step benchmark: times the model shapes of ``sft_jax.benchmark_shapes`` (random
weights, FLOP counts, peak FLOP/s) in the project's own train step.

One step is the project's own ``steps.make_train_step`` (AdamW, task loss, donated state) on a
random batch of full (unpadded) rows. Reported per model: first-call (compile) time, median step
time, tokens/s, model FLOP/s and MFU, the number of compilations and peak device memory;
optionally the same step in PyTorch (``transformers`` model + ``torch.optim.AdamW``,
``sft_jax.benchmark_torch``).
With ``policy`` (``run_jax(..., policy="lora:8", optimizer="adamw")``) the step trains what a
freezing preset trains, with the trainer's optimizer construction (``sft_jax.benchmark_policies``);
every run also reports trainable parameters, optimizer-state bytes and XLA's memory analysis of
the compiled step (``compiled_memory``), the estimated peak where the device keeps no statistics,
and what the compiled step communicates between devices (``collectives``: count and bytes per
kind, ``collectives.collective_traffic``).

Imports only jax, flax, optax, numpy (torch and transformers: ``benchmark_torch``, lazily): no
ml_collections, grain, tensorflow-datasets, tensorboardX or gguf.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from concurrent import futures
from typing import Any, Callable

import jax
import optax

from sft_jax import collectives, loss_scale, profiling, sharding, steps, tasks, tree_util
from sft_jax.benchmark_shapes import (
    BenchSpec,
    build_model,
    make_batch,
    mfu,
    peak_flops,
    step_flops,
)
from sft_jax.kernel_choices import Kernels
from sft_jax.train_state import (
    StepSetup,
    create_train_state,
    shardings_of,
    split_model,
    stats_mask,
)

LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-5, 0.01, 1.0


# ---------------------------------------------------------------------------------------------
# The JAX step


def adamw() -> optax.GradientTransformation:
    """``optim.build_optimizer``'s AdamW chain (clip, AdamW, decay on matrices only) at a constant
    rate, built with optax directly: ``sft_jax.optim`` imports ml_collections at module level.
    Its ``multi_transform`` over frozen leaves is left out (nothing is frozen here)."""
    decay = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.clip_by_global_norm(CLIP_NORM),
        optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mask=decay),
    )


def build_step(
    spec: BenchSpec,
    mesh_shape=(1, 1, 1),
    seed: int = 0,
    policy: str | None = None,
    optimizer: str = "adamw",
) -> tuple[Any, ...]:
    """``(state, jitted train_step, device batch, mesh, trainable mask)`` for ``spec`` on a
    ``(data, fsdp, tensor)`` mesh.

    ``policy`` None: every parameter trains with ``adamw()`` (no ml_collections needed).
    Otherwise the freezing preset ``policy`` and ``optimizer`` (an ``optimizer.name``), built as
    the trainer builds them (``sft_jax.benchmark_policies``).
    """
    model = build_model(spec, seed)
    scaled = loss_scale.needed(spec.config.dtype)  # float16: a dynamic loss scale, as the trainer
    if policy is None:
        if optimizer != "adamw":
            raise ValueError(f"optimizer={optimizer!r} needs a policy (e.g. 'full')")
        graphdef, params = split_model(model)  # Params and BatchNorm statistics
        stats = stats_mask(model)
        trainable = jax.tree.map(lambda _: True, params) if stats is None else (
            jax.tree.map(lambda s: not s, stats))  # fmt: skip
        tx, lr = adamw(), optax.constant_schedule(LEARNING_RATE)
        if stats is not None:  # statistics: no optimizer state, never updated by it
            labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
            tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
        if scaled:
            tx = optax.chain(loss_scale.dynamic_loss_scale(), tx)
        del params
    else:
        from sft_jax import benchmark_policies as bp

        cfg = bp.optimizer_config(optimizer, LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM)
        model, groups, tx, lr, stats = bp.policy_model(model, policy, cfg, seed, loss_scale=scaled)
        graphdef, _ = split_model(model)  # after the adapters were inserted
        trainable = groups.trainable
    mesh = sharding.make_mesh(mesh_shape)
    state = create_train_state(model, tx, mesh, seed)
    del model  # the state holds the (donated) parameters from here on
    setup = StepSetup(
        graphdef, tx, trainable, lr, mesh, shardings_of(state), sharding.batch_sharding(mesh),
        stats,
    )  # fmt: skip
    step_fn = steps.make_train_step(setup, tasks.get_task(spec.task))
    whole = make_batch(spec, seed)
    batch = sharding.put_batch(
        sharding.local_rows(whole, setup.batch_sharding), setup.batch_sharding
    )
    return state, step_fn, batch, mesh, trainable


def time_calls(call: Callable[[], None], warmup: int, steps_: int) -> tuple[float, list[float]]:
    """``(first call s, [timed call s])``: one first call, ``warmup`` untimed, ``steps_`` timed.
    ``call`` must block until its work is done."""
    if steps_ < 1:
        raise ValueError(f"need at least one timed step, got {steps_}")
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps_):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times


def time_pipelined(dispatch: Callable[[], None], wait: Callable[[], None], steps_: int) -> float:
    """Seconds per call of ``steps_`` calls of ``dispatch`` issued back to back, then one
    ``wait`` for the last: the rate of a training loop that does not wait for each step (the
    host enqueues step n + 1 while the device runs step n). ``time_calls`` waits for every call,
    so its times also hold the host's launch latency of each step."""
    if steps_ < 1:
        raise ValueError(f"need at least one timed step, got {steps_}")
    wait()
    start = time.perf_counter()
    for _ in range(steps_):
        dispatch()
    wait()
    return (time.perf_counter() - start) / steps_


def _peak_bytes(device: Any) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled step (``step_fn.lower(state, batch).compile()``: after
    the step has run this is jit's cached compilation, nothing is recompiled), per device:
    argument, output, temporary and aliased (donated) bytes, and ``estimated_peak_bytes`` =
    argument + output + temporary - aliased. None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError):
        return None
    if m is None:
        return None
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["estimated_peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def _cache_size(fn: Any) -> int | None:
    size = getattr(fn, "_cache_size", None)  # private jit API: may vanish in a later jax
    return int(size()) if callable(size) else None


def run_jax(
    spec: BenchSpec,
    warmup: int = 2,
    steps_: int = 10,
    mesh_shape=(1, 1, 1),
    peak: float | None = None,
    seed: int = 0,
    policy: str | None = None,
    optimizer: str = "adamw",
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Times the JAX train step of ``spec``.

    Args:
        spec: Model shape and batch.
        warmup: Untimed calls after the first (compiling) one.
        steps_: Timed calls; the step time is their median.
        mesh_shape: ``(data, fsdp, tensor)``.
        peak: Peak FLOP/s per device; default from ``PEAK_FLOPS`` by the device kind.
        seed: Seed of the weights and the batch.
        policy: Freezing preset (``head_only``, ``bitfit``, ``lora:8``, ``full``, ...); None:
            every parameter trains with AdamW (see ``build_step``).
        optimizer: ``optimizer.name`` used with ``policy``.
        profile_dir: Also trace 2 more steps with ``jax.profiler`` into this directory and
            return the time per XLA operation kind (``profile_ops``, ``sft_jax.profiling``).

    Returns:
        A flat dict of the measurements (JSON-ready). Memory: ``peak_bytes`` is the device's
        ``peak_bytes_in_use`` (None where the device keeps no statistics, e.g. CPU; the process's
        peak so far, see ``run_jax_isolated``); ``compiled_memory`` XLA's analysis of the step;
        ``peak_memory_bytes`` the first of the two that exists, ``peak_memory_source`` which.
        ``host_page_faults_per_step``: the process's minor page faults per pipelined step (on
        CPU, memory the step gets from the OS afresh; see ``sft_jax.cpu_allocator``);
        ``host_max_rss_bytes`` the process's peak resident memory so far (Linux).
    """
    state, step_fn, batch, mesh, trainable = build_step(spec, mesh_shape, seed, policy, optimizer)
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    sizes = {
        "num_trainable_params": tree_util.count(state.params, trainable),
        "optimizer_state_bytes": tree_util.nbytes(state.opt_state),
    }
    holder = {"state": state}
    del state

    def dispatch():
        holder["state"], holder["metrics"] = step_fn(holder["state"], batch)

    def wait():
        jax.block_until_ready((holder["state"], holder["metrics"]))

    def call():
        dispatch()
        wait()

    first, times = time_calls(call, warmup, steps_)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pipelined = time_pipelined(dispatch, wait, steps_)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps_
    ops = None
    if profile_dir is not None:
        ops = profiling.profile_ops(call, 2, profile_dir)
    devices = list(mesh.devices.flat)
    kind = devices[0].device_kind
    peak = peak if peak is not None else peak_flops(kind, spec.config.dtype)
    total_peak = None if peak is None else peak * len(devices)
    out = _summary(spec, first, times, total_peak, pipelined)
    device_peak = _peak_bytes(devices[0])
    compiled = step_fn.lower(holder["state"], batch).compile()
    memory = compiled_memory(compiled)
    estimated = None if memory is None else memory["estimated_peak_bytes"]
    out.update(
        device=kind, platform=devices[0].platform, num_devices=len(devices),
        num_params=n_params, compilations=_cache_size(step_fn),
        peak_bytes=device_peak, loss=float(holder["metrics"]["loss"]),
        host_page_faults_per_step=faults,
        host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        policy=policy, optimizer=optimizer, **sizes, compiled_memory=memory,
        collectives=collectives.collective_traffic(compiled.as_text()),
        peak_memory_bytes=device_peak if device_peak is not None else estimated,
        peak_memory_source="device" if device_peak is not None else (
            "estimated" if estimated is not None else None),
    )  # fmt: skip
    if ops is not None:
        out["profile_ops"] = ops[:40]
    return out


def run_jax_isolated(
    spec: BenchSpec, kernels: Kernels = Kernels(), **kwargs: Any
) -> dict[str, Any]:
    """``run_jax`` in a fresh (spawned) process, under ``kernels.scope()``: its device
    ``peak_bytes`` is then this run's own, not the running maximum of the runs before it. The
    caller must not hold the accelerator (JAX preallocates most of a GPU's memory in the first
    process that uses it)."""
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_jax_under, spec, kernels, kwargs).result()


def _run_jax_under(spec: BenchSpec, kernels: Kernels, kwargs: dict) -> dict:
    with kernels.scope():
        return run_jax(spec, **kwargs)


def _summary(
    spec: BenchSpec,
    first: float,
    times: list[float],
    peak: float | None,
    pipelined: float | None = None,
) -> dict[str, Any]:
    """The step-time, throughput and FLOP fields of a run (median over ``times``), and the
    ``pipelined_*`` ones of ``time_pipelined``'s seconds per step where given."""
    step_s = statistics.median(times)
    flops = step_flops(spec)
    return {
        "model": spec.name,
        "dtype": spec.config.dtype,
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "tokens_per_step": spec.tokens,
        "unit": spec.unit,
        "throughput_per_s": spec.tokens / step_s,
        "flops_per_step": flops,
        "first_call_s": first,
        "compile_s": max(first - step_s, 0.0),  # first call minus one steady-state step
        "step_ms": 1e3 * step_s,
        "step_ms_all": [1e3 * t for t in times],
        "tokens_per_s": spec.tokens / step_s,
        "tflops_per_s": flops / step_s / 1e12,
        "peak_flops": peak,
        "mfu": mfu(flops, step_s, peak),
        "pipelined_step_ms": None if pipelined is None else 1e3 * pipelined,
        "pipelined_tokens_per_s": None if pipelined is None else spec.tokens / pipelined,
        "pipelined_mfu": None if pipelined is None else mfu(flops, pipelined, peak),
    }
