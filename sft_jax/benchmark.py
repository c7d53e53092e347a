"""Training-step benchmark: model shapes with random weights, FLOP counts, peak FLOP/s, timing.

One step is the project's own ``steps.make_train_step`` (AdamW, task loss, donated state) on a
random batch of full (unpadded) rows. Reported per model: first-call (compile) time, median step
time, tokens/s, model FLOP/s and MFU, the number of compilations and peak device memory;
optionally the same step in PyTorch (``transformers`` model + ``torch.optim.AdamW``,
``sft_jax.benchmark_torch``).
With ``policy`` (``run_jax(..., policy="lora:8", optimizer="adamw")``) the step trains what a
freezing preset trains, with the trainer's optimizer construction (``sft_jax.benchmark_policies``);
every run also reports trainable parameters, optimizer-state bytes and XLA's memory analysis of
the compiled step (``compiled_memory``), the estimated peak where the device keeps no statistics.

Model FLOPs per step (PaLM, Chowdhery et al. 2022, appendix B; no rematerialization counted):

    6 * P_tok * B * T  +  6 * P_seq * B  +  12 * L * (N * D) * T^2 * B

Image models (ResNet-50, ViT-B/16) count the same way, from the forward pass's jaxpr: 3 x the
FLOPs of its matmuls and convolutions (``sft_jax.flop_count``; for the text models that count
equals the formula above). Their throughput is in images per second.

``P_tok``: matmul parameters applied to every token (attention and MLP projections, and the LM
head, tied or not; not the embedding lookups). ``P_seq``: matmul parameters applied once per
sequence (BERT's pooler and classifier see only [CLS]). The last term is QK^T and AV, forward
(2 matmuls x 2 FLOPs) plus backward (2x forward), with N * D the query width; causal masks are
not discounted because the attention computes the full T x T scores.

Imports only jax, flax, optax, numpy (torch and transformers: ``benchmark_torch``, lazily): no
ml_collections, grain, tensorflow-datasets, tensorboardX or gguf.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import statistics
import time
from concurrent import futures
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx

from sft_jax import flop_count, sharding, steps, tasks, tree_util
from sft_jax.models.bert import BertConfig, BertForSequenceClassification
from sft_jax.models.heads import HeadConfig
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.models.resnet import ResNetConfig, ResNetForImageClassification
from sft_jax.models.vit import ViTConfig, ViTForImageClassification
from sft_jax.train_state import (
    StepSetup,
    create_train_state,
    shardings_of,
    split_model,
    stats_mask,
)

LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-5, 0.01, 1.0


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmarked shape: a model config (compute dtype set, params float32) and a batch.

    Attributes:
        name: Short name (``minilm-l6``, ...).
        config: ``BertConfig`` (classification), ``LlamaConfig`` (causal LM), ``ResNetConfig`` or
            ``ViTConfig`` (image classification, ``config.num_labels`` classes).
        batch_size: Rows (images) per step B.
        seq_len: Tokens per row T; for images the side of the square image in pixels.
        num_labels: Classes of the text classification head (BERT only).
    """

    name: str
    config: BertConfig | LlamaConfig | ResNetConfig | ViTConfig
    batch_size: int
    seq_len: int
    num_labels: int = 3

    @property
    def task(self) -> str:
        if isinstance(self.config, (ResNetConfig, ViTConfig)):
            return "image_classification"
        return "classification" if isinstance(self.config, BertConfig) else "causal_lm"

    @property
    def unit(self) -> str:
        """What the throughput counts: ``tokens`` or ``images``."""
        return "images" if self.task == "image_classification" else "tokens"

    @property
    def tokens(self) -> int:
        """Units of work per step: non-padding tokens (every token here), or images."""
        if self.unit == "images":
            return self.batch_size
        return self.batch_size * self.seq_len


_LLAMA_1B = dict(  # Llama-3.2-1B
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip
_TINY_BERT = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=32,
)  # fmt: skip
_TINY_LLAMA = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip

_TINY_RESNET = dict(embedding_size=8, hidden_sizes=(16, 32), depths=(1, 1), num_labels=5)
_TINY_VIT = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    image_size=32, patch_size=8, num_labels=5,
)  # fmt: skip

# name -> (config factory taking dtype overrides, default batch size, default sequence length).
SHAPES: dict[str, tuple[Callable[..., Any], int, int]] = {
    "minilm-l6": (BertConfig.minilm_l6, 32, 128),
    "bert-base": (BertConfig.bert_base, 32, 128),
    "smollm2-135m": (LlamaConfig.smollm2_135m, 8, 1024),
    "llama-1b": (lambda **kw: LlamaConfig(**_LLAMA_1B, **kw), 4, 1024),
    "resnet-50": (ResNetConfig.resnet_50, 64, 224),
    "vit-b16": (ViTConfig.vit_b16, 64, 224),
    "tiny-bert": (lambda **kw: BertConfig(**_TINY_BERT, **kw), 2, 8),
    "tiny-llama": (lambda **kw: LlamaConfig(**_TINY_LLAMA, **kw), 2, 8),
    "tiny-resnet": (lambda **kw: ResNetConfig(**_TINY_RESNET, **kw), 2, 32),
    "tiny-vit": (lambda **kw: ViTConfig(**_TINY_VIT, **kw), 2, 32),
}


def get_spec(
    name: str,
    dtype: str = "float32",
    batch_size: int | None = None,
    seq_len: int | None = None,
    **overrides: Any,
) -> BenchSpec:
    """The registered shape ``name`` with compute ``dtype`` (parameters stay float32) and
    config field ``overrides`` (e.g. ``attention_probs_dropout_prob=0.0``). A ViT's
    ``image_size`` follows ``seq_len``."""
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(SHAPES)}")
    factory, default_b, default_t = SHAPES[name]
    seq_len = seq_len or default_t
    config = factory(dtype=dtype, param_dtype="float32", **overrides)
    if isinstance(config, ViTConfig):
        config = dataclasses.replace(config, image_size=seq_len)
    return BenchSpec(name, config, batch_size or default_b, seq_len)


# ---------------------------------------------------------------------------------------------
# FLOPs, peaks, MFU


def matmul_params(config: BertConfig | LlamaConfig, num_labels: int = 3) -> tuple[int, int]:
    """(per-token, per-sequence) matmul parameter counts; embedding lookups excluded."""
    h, n_layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    if isinstance(config, BertConfig):
        layer = 4 * h * h + 2 * h * inter  # q, k, v, attention output; MLP in and out
        return n_layers * layer, h * h + h * num_labels  # pooler + classifier on [CLS]
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = 2 * h * q + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    return n_layers * layer + h * config.vocab_size, 0  # + LM head (tied or not)


def attention_flops(config: BertConfig | LlamaConfig, batch_size: int, seq_len: int) -> int:
    """QK^T and AV, forward and backward: 12 * L * (N * D) * T^2 * B."""
    if isinstance(config, BertConfig):
        width = config.hidden_size
    else:
        width = config.num_attention_heads * config.head_dim
    return 12 * config.num_hidden_layers * width * seq_len**2 * batch_size


def step_flops(spec: BenchSpec) -> int:
    """Model FLOPs of one training step (forward + backward), see the module docstring."""
    if spec.task == "image_classification":
        return 3 * forward_flops(spec)
    per_tok, per_seq = matmul_params(spec.config, spec.num_labels)
    b, t = spec.batch_size, spec.seq_len
    return 6 * per_tok * b * t + 6 * per_seq * b + attention_flops(spec.config, b, t)


def forward_flops(spec: BenchSpec) -> int:
    """Matmul + convolution FLOPs of one forward pass over the spec's batch, counted from the
    jaxpr of the model built abstractly (``sft_jax.flop_count``: no weights are allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(spec)))
    # Shapes only: one real row, the leading axis widened to the batch (no B-row random batch).
    row = make_batch(dataclasses.replace(spec, batch_size=1))
    batch = {
        k: jax.ShapeDtypeStruct((spec.batch_size, *x.shape[1:]), x.dtype) for k, x in row.items()
    }
    task = tasks.get_task(spec.task)
    forward = lambda state, b: task.logits(nnx.merge(graphdef, state), b, None)
    return flop_count.matmul_flops(forward, state, batch)


# Dense peak FLOP/s per device: (device_kind substring, bfloat16 peak, float32 peak). First match
# wins, so more specific names come first. GPU float32 peaks are the non-tensor-core figures;
# JAX computes float32 matmuls in TF32 on these GPUs by default, so float32 MFU against them can
# exceed what the hardware's plain float32 units allow. TPUs run float32 matmuls as bfloat16
# passes: one peak for both. The CPU figure is the development machine's (2 cores).
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 67e12),
    ("h100", 989e12, 67e12),
    ("a100", 312e12, 19.5e12),
    ("v6 lite", 918e12, 918e12),
    ("v6e", 918e12, 918e12),
    ("v5 lite", 197e12, 197e12),
    ("v5e", 197e12, 197e12),
    ("v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("v4", 275e12, 275e12),
    ("cpu", 76e9, 76e9),
)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one device of ``device_kind`` (``jax.devices()[0].device_kind``) for
    ``dtype`` compute, or None when the kind is not in ``PEAK_FLOPS``."""
    kind = device_kind.lower()
    for pattern, bf16, f32 in PEAK_FLOPS:
        if pattern in kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def mfu(flops_per_step: float, step_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over ``peak`` (all devices together)."""
    if not peak or step_s <= 0:
        return None
    return flops_per_step / step_s / peak


# ---------------------------------------------------------------------------------------------
# The JAX step


def make_batch(spec: BenchSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A random host batch of full rows in the task's format (see ``sft_jax.tasks``)."""
    rng = np.random.default_rng(seed)
    if spec.task == "image_classification":
        b, side, c = spec.batch_size, spec.seq_len, spec.config.num_channels
        return {
            "pixel_values": rng.standard_normal((b, side, side, c), dtype=np.float32),
            "labels": rng.integers(0, spec.config.num_labels, (b,), dtype=np.int32),
            "example_mask": np.ones((b,), np.float32),
        }
    b, t, v = spec.batch_size, spec.seq_len, spec.config.vocab_size
    ones = np.ones((b, t), np.int32)
    if spec.task == "classification":
        return {
            "input_ids": rng.integers(1, v, (b, t), dtype=np.int32),
            "attention_mask": ones,
            "token_type_ids": np.zeros((b, t), np.int32),
            "labels": rng.integers(0, spec.num_labels, (b,), dtype=np.int32),
            "example_mask": np.ones((b,), np.float32),
        }
    tokens = rng.integers(0, v, (b, t + 1), dtype=np.int32)
    return {
        "input_ids": tokens[:, :-1],  # [B, T]
        "targets": tokens[:, 1:],  # [B, T]
        "target_mask": ones,
        "segment_ids": ones,  # one segment per row
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def build_model(spec: BenchSpec, seed: int = 0) -> nnx.Module:
    """The spec's model with random weights."""
    rngs = nnx.Rngs(seed)
    if spec.task == "classification":
        return BertForSequenceClassification(spec.config, spec.num_labels, rngs=rngs)
    if isinstance(spec.config, ResNetConfig):
        return ResNetForImageClassification(spec.config, HeadConfig(), rngs=rngs)
    if isinstance(spec.config, ViTConfig):
        return ViTForImageClassification(spec.config, HeadConfig(), rngs=rngs)
    return LlamaForCausalLM(spec.config, rngs=rngs)


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
        del params
    else:
        from sft_jax import benchmark_policies as bp

        cfg = bp.optimizer_config(optimizer, LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM)
        model, groups, tx, lr, stats = bp.policy_model(model, policy, cfg, seed)
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
    batch = sharding.put_batch(make_batch(spec, seed), setup.batch_sharding)
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


def compiled_memory(step_fn: Any, state: Any, batch: Any) -> dict[str, int] | None:
    """XLA's memory analysis of ``step_fn`` compiled for these arguments (their shapes and
    shardings; after the step has run this is jit's cached compilation, nothing is recompiled),
    per device: argument, output, temporary and aliased (donated) bytes, and
    ``estimated_peak_bytes`` = argument + output + temporary - aliased. None where the backend
    gives no analysis."""
    try:
        m = step_fn.lower(state, batch).compile().memory_analysis()
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
        from sft_jax import profiling

        ops = profiling.profile_ops(call, 2, profile_dir)
    devices = list(mesh.devices.flat)
    kind = devices[0].device_kind
    peak = peak if peak is not None else peak_flops(kind, spec.config.dtype)
    total_peak = None if peak is None else peak * len(devices)
    out = _summary(spec, first, times, total_peak, pipelined)
    device_peak = _peak_bytes(devices[0])
    memory = compiled_memory(step_fn, holder["state"], batch)
    estimated = None if memory is None else memory["estimated_peak_bytes"]
    out.update(
        device=kind, platform=devices[0].platform, num_devices=len(devices),
        num_params=n_params, compilations=_cache_size(step_fn),
        peak_bytes=device_peak, loss=float(holder["metrics"]["loss"]),
        host_page_faults_per_step=faults,
        host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        policy=policy, optimizer=optimizer, **sizes, compiled_memory=memory,
        peak_memory_bytes=device_peak if device_peak is not None else estimated,
        peak_memory_source="device" if device_peak is not None else (
            "estimated" if estimated is not None else None),
    )  # fmt: skip
    if ops is not None:
        out["profile_ops"] = ops[:40]
    return out


def run_jax_isolated(
    spec: BenchSpec,
    attention: str = "xla",
    dropout: str = "threefry",
    loss_chunk: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """``run_jax`` in a fresh (spawned) process, under ``attention_implementation``,
    ``dropout_implementation`` and ``lm_loss.loss_chunk_scope``: its device
    ``peak_bytes`` is then this run's own, not the running maximum of the runs before it. The
    caller must not hold the accelerator (JAX preallocates most of a GPU's memory in the first
    process that uses it)."""
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_jax_under, spec, attention, dropout, loss_chunk, kwargs).result()


def _run_jax_under(
    spec: BenchSpec, attention_impl: str, dropout_impl: str, loss_chunk: int, kwargs: dict
) -> dict:
    from sft_jax import lm_loss
    from sft_jax.models import attention, dropout

    with attention.attention_implementation(attention_impl):
        with dropout.dropout_implementation(dropout_impl), lm_loss.loss_chunk_scope(loss_chunk):
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
