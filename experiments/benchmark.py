"""Training-step benchmark of model shapes with random weights (see ``sft_jax.benchmark``).

  python -m experiments.benchmark [--models minilm-l6,bert-base,smollm2-135m,llama-1b,
      resnet-50,vit-b16] [--attention_dropout P]
      [--dtype float32|bfloat16] [--batch_size B] [--seq_len T] [--steps 10] [--warmup 2]
      [--mesh 1,1,1] [--peak_flops F] [--torch] [--out benchmark.json]
      [--attention xla|cudnn|cudnn_packed [--packed_max_segments M]] [--dropout threefry|hash]
      [--loss_chunk C] [--remat none|full] [--cpu_matmul xla|onednn]
      [--cpu_allocator auto|reuse|system]
      [--policies head_only,bitfit,lora:8,full [--optimizer adamw] [--isolate]]

Prints one row per model (compile s, median step ms, tokens/s, TFLOP/s, MFU, and with --torch
the PyTorch step time and torch_ms / jax_ms, > 1 meaning JAX is faster) and writes every number
to --out. "step ms" waits for each step before the next is issued; "piped ms" issues --steps
steps back to back and waits once (``benchmark.time_pipelined``: a loop that never waits per
step, so the host's launch latency overlaps the device's work), with its MFU and, with --torch,
the PyTorch step timed the same way and its ratio (with ``--cpu_allocator reuse``, the
default on CPU-only installs, JAX's CPU computations run inline, so "piped" equals "step"
there). With --torch every PyTorch run goes first, each in its own spawned process, before JAX
initializes the device: the frameworks never share a process (their CUDA libraries may differ)
nor GPU memory; they inherit the allocator settings (``sft_jax.cpu_allocator``).
``peak_bytes`` of the JAX runs is the process's peak so far (JAX cannot reset it): with several
models, a running maximum (``--isolate`` runs each JAX measurement in its own process instead).

``--policies``: every model once per freezing preset, built as the trainer builds it (LoRA
adapters, parameter groups, ``optim.build_optimizer`` with ``--optimizer``); prints trainable
parameters, optimizer-state MB, peak memory and step time per (model, policy). Peak memory is
the device's ``peak_bytes_in_use`` where it keeps statistics (GPU, TPU), else XLA's memory
analysis of the compiled step (arguments + outputs + temporaries - donated buffers) marked
"est". A policy that leaves nothing to train on a model (``bitfit`` on a model without
biases) gets a row with the reason. On CPU, e.g.
``--models minilm-l6,smollm2-135m --seq_len 256 --batch_size 4 --policies ... --steps 3``.
"""

import datetime
import json
import os

from absl import app, flags

_MODELS = flags.DEFINE_string(
    "models",
    "minilm-l6,bert-base,smollm2-135m,llama-1b,resnet-50,vit-b16",
    "Comma list of registered shapes (also tiny-bert, tiny-llama, tiny-resnet, tiny-vit for "
    "smoke runs). Image models: --seq_len is the image side (default 224).",
)
_ATTN_DROPOUT = flags.DEFINE_float(
    "attention_dropout", None, "Override the attention-probability dropout of BERT / ViT "
    "(attention_probs_dropout_prob) or Llama (attention_dropout); cudnn attention needs 0."
)  # fmt: skip
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype (float16: loss-scaled)."
)
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per step (default: per model).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: per model).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the compiling one.")
_MESH = flags.DEFINE_string("mesh", "1,1,1", "Mesh shape (data,fsdp,tensor); -1 takes the rest.")
_PEAK = flags.DEFINE_float("peak_flops", None, "Peak FLOP/s per device (default: by kind).")
_TORCH = flags.DEFINE_boolean("torch", False, "Also time the PyTorch (transformers) step.")
_OUT = flags.DEFINE_string("out", "benchmark.json", "JSON output path.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and batches.")
_DATA_CONFIG = flags.DEFINE_string(
    "data_config", None, "Also time this config's real input pipeline (configs/NAME.py[:ARG])."
)
# The kernel choices dropout, attention, packed_max_segments, loss_chunk and remat are named as
# the fields of kernel_choices.Kernels, which _kernels reads by name.
flags.DEFINE_enum(
    "dropout", "threefry", ["threefry", "hash"], "How dropout masks are drawn (dropout.dropout)."
)
flags.DEFINE_enum(
    "attention", "xla", ["xla", "cudnn", "cudnn_packed"],
    "Attention kernel (cudnn: fused, GPU, bf16/fp16; cudnn_packed: also segment ids as cuDNN "
    "sequence lengths / packed layout instead of a dense mask).",
)  # fmt: skip
flags.DEFINE_integer(
    "packed_max_segments", 16, "Segments per row cudnn_packed describes (runtime."
    "packed_max_segments; 1 = padded rows: the benchmark's rows are one sequence each)."
)  # fmt: skip
_CPU_MATMUL = flags.DEFINE_enum(
    "cpu_matmul", "xla", ["xla", "onednn"], "XLA CPU matmul library (runtime.cpu_matmul)."
)
_CPU_ALLOCATOR = flags.DEFINE_enum(
    "cpu_allocator", "auto", ["auto", "reuse", "system"], "Whether freed host memory stays in "
    "the process (runtime.cpu_allocator; auto: reuse on CPU-only installs)."
)  # fmt: skip
flags.DEFINE_integer(
    "loss_chunk", 0, "Causal LM loss in chunks of this many positions (runtime.loss_chunk; 0 = "
    "whole sequence)."
)  # fmt: skip
flags.DEFINE_enum(
    "remat", "none", ["none", "full"], "Recompute each block's activations (transformer blocks, "
    "ResNet / EfficientNet blocks) in the backward pass (runtime.remat)."
)  # fmt: skip
_PROFILE = flags.DEFINE_string(
    "profile", None, "Trace 2 extra steps per model with jax.profiler into DIR/MODEL and print "
    "the time per XLA operation kind (also in the JSON as profile_ops)."
)  # fmt: skip
_POLICIES = flags.DEFINE_list(
    "policies", [], "Freezing presets to compare (e.g. head_only,bitfit,lora:8,full); default: "
    "none, every parameter trained with AdamW."
)  # fmt: skip
_OPTIMIZER = flags.DEFINE_string("optimizer", "adamw", "optimizer.name with --policies.")
_ISOLATE = flags.DEFINE_bool(
    "isolate", False, "Each JAX measurement in its own process (per-run device peak memory)."
)

_COLUMNS = (
    ("model", 14, "{}"), ("device", 22, "{}"), ("dtype", 9, "{}"), ("B x T", 10, "{}"),
    ("compile s", 10, "{:.1f}"), ("step ms", 10, "{:.1f}"), ("tok|img/s", 11, "{:.0f}"),
    ("TFLOP/s", 9, "{:.2f}"), ("MFU %", 7, "{:.1f}"), ("torch ms", 10, "{:.1f}"),
    ("ratio", 6, "{:.2f}"), ("piped ms", 10, "{:.1f}"), ("MFU %", 7, "{:.1f}"),
    ("torch", 8, "{:.1f}"), ("ratio", 6, "{:.2f}"),
)  # fmt: skip


def _row(r: dict) -> list:
    t = r.get("torch") or {}

    def pct(x):
        return None if x is None else 100 * x

    return [
        r["model"], r["device"][:21], r["dtype"], f"{r['batch_size']}x{r['seq_len']}",
        r["compile_s"], r["step_ms"], r["throughput_per_s"], r["tflops_per_s"], pct(r["mfu"]),
        t.get("step_ms"), r.get("torch_over_jax"), r.get("pipelined_step_ms"),
        pct(r.get("pipelined_mfu")), t.get("pipelined_step_ms"),
        r.get("torch_over_jax_pipelined"),
    ]  # fmt: skip


def _table(results: list[dict]) -> str:
    def fmt(v, width, spec):
        return ("-" if v is None else spec.format(v)).rjust(width)

    lines = ["".join(name.rjust(w) for name, w, _ in _COLUMNS)]
    for r in results:
        lines.append("".join(fmt(v, w, s) for v, (_, w, s) in zip(_row(r), _COLUMNS)))
    return "\n".join(lines)


_POLICY_COLUMNS = (
    ("model", 14, "{}"), ("policy", 16, "{}"), ("B x T", 10, "{}"), ("trainable", 13, "{:,}"),
    ("opt state MB", 14, "{:.2f}"), ("peak MB", 12, "{}"), ("step ms", 10, "{:.1f}"),
    ("tokens/s", 11, "{:.0f}"),
)  # fmt: skip


def _policy_row(r: dict) -> list:
    if "error" in r:
        return [r["model"], r["policy"], None, None, None, None, None, None]
    peak = r["peak_memory_bytes"]
    est = "" if r["peak_memory_source"] == "device" else " est"
    return [
        r["model"], r["policy"], f"{r['batch_size']}x{r['seq_len']}", r["num_trainable_params"],
        r["optimizer_state_bytes"] / 1e6, None if peak is None else f"{peak / 1e6:,.0f}{est}",
        r["step_ms"], r["tokens_per_s"],
    ]  # fmt: skip


def _policy_table(results: list[dict]) -> str:
    def fmt(v, width, spec):
        return ("-" if v is None else spec.format(v)).rjust(width)

    lines = ["".join(name.rjust(w) for name, w, _ in _POLICY_COLUMNS)]
    for r in results:
        cells = zip(_policy_row(r), _POLICY_COLUMNS)
        lines.append("".join(fmt(v, w, s) for v, (_, w, s) in cells))
        if "error" in r:
            lines.append(f"    {r['model']} / {r['policy']}: {r['error']}")
    return "\n".join(lines)


def _run_policy(benchmark, spec, policy: str, mesh, run: dict) -> dict:
    """One (model, policy) measurement, or a row with the reason it does not apply."""
    kw = dict(mesh_shape=mesh, peak=_PEAK.value, policy=policy, optimizer=_OPTIMIZER.value, **run)
    try:
        return _measure(benchmark, spec, kw)
    except ValueError as e:  # the policy leaves nothing to train on this model
        return {"model": spec.name, "policy": policy, "optimizer": _OPTIMIZER.value,
                "error": str(e)}  # fmt: skip


def _collectives_line(r: dict) -> str | None:
    """What a multi-device step communicates (``collectives.collective_traffic``), one line."""
    if r.get("num_devices", 1) == 1 or "collectives" not in r:
        return None
    used = [f"{op} {c['count']} ({c['bytes'] / 1e6:,.3f} MB)" for op, c in r["collectives"].items()
            if c["count"]]  # fmt: skip
    return (
        f"{r['model']} on {r['num_devices']} devices, collectives per step (result bytes per "
        f"device): {', '.join(used) or 'none'}"
    )


def _kernels():
    from sft_jax.kernel_choices import Kernels

    return Kernels.from_config(lambda name, default: flags.FLAGS[name].value)  # same names


def _measure(benchmark, spec, kw: dict) -> dict:
    """``run_jax`` here (under the flags' kernel choices, set in ``main``) or in its own
    process."""
    if _ISOLATE.value:
        return benchmark.run_jax_isolated(spec, _kernels(), **kw)
    return benchmark.run_jax(spec, **kw)


def _pipeline(spec: str) -> dict:
    """Loads ``configs/NAME.py[:ARG]`` (as ``--config`` does) and times its input pipeline."""
    import importlib.util

    from sft_jax.pipeline_speed import pipeline_throughput

    path, _, arg = spec.partition(":")
    loader = importlib.util.spec_from_file_location("benchmark_data_config", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return pipeline_throughput(module.get_config(arg))


def _overrides(name: str) -> dict:
    """Config overrides from the flags for model ``name``."""
    if _ATTN_DROPOUT.value is None:
        return {}
    from sft_jax import benchmark_shapes

    config = benchmark_shapes.get_spec(name).config
    for field in ("attention_dropout", "attention_probs_dropout_prob"):  # Llama; BERT / ViT
        if hasattr(config, field):
            return {field: _ATTN_DROPOUT.value}
    raise app.UsageError(f"--attention_dropout: {name} has no attention dropout")


def main(argv):
    del argv
    import flax
    import jax

    from sft_jax import benchmark, benchmark_shapes, benchmark_torch
    from sft_jax.runtime import set_cpu_allocator, set_cpu_matmul

    # Both before the first JAX computation starts the backend.
    allocator = set_cpu_allocator(_CPU_ALLOCATOR.value)
    set_cpu_matmul(_CPU_MATMUL.value)
    _kernels().set()
    if _POLICIES.value and _TORCH.value:
        raise app.UsageError("--torch times the all-parameters AdamW step: not with --policies")
    if _OPTIMIZER.value != "adamw" and not _POLICIES.value:
        raise app.UsageError("--optimizer needs --policies (e.g. --policies full)")
    names = [m.strip() for m in _MODELS.value.split(",") if m.strip()]
    specs = [
        benchmark_shapes.get_spec(n, _DTYPE.value, _BATCH.value, _SEQ.value, **_overrides(n))
        for n in names
    ]
    mesh = tuple(int(x) for x in _MESH.value.split(","))
    run = dict(warmup=_WARMUP.value, steps_=_STEPS.value, seed=_SEED.value)
    kernels = dict(_kernels().as_dict(), cpu_matmul=_CPU_MATMUL.value, cpu_allocator=allocator)
    # Before any JAX device use: each torch run has the whole device and exits (see above).
    torch_runs = [benchmark_torch.run_torch(s, **run) for s in specs] if _TORCH.value else None
    results = []
    for i, spec in enumerate(specs):
        if _POLICIES.value:
            for policy in _POLICIES.value:
                r = _run_policy(benchmark, spec, policy, mesh, run)
                r.update(kernels)
                results.append(r)
                jax.clear_caches()
            continue
        kw = dict(mesh_shape=mesh, peak=_PEAK.value, **run)
        if _PROFILE.value:
            kw["profile_dir"] = os.path.join(_PROFILE.value, spec.name)
        r = _measure(benchmark, spec, kw)
        if "profile_ops" in r:
            from sft_jax.profiling import format_ops

            print(f"{spec.name}: time per XLA operation kind\n{format_ops(r['profile_ops'])}")
        r.update(kernels)
        if torch_runs:
            r["torch"] = torch_runs[i]
            r["torch_over_jax"] = torch_runs[i]["step_ms"] / r["step_ms"]
            if r.get("pipelined_step_ms") and torch_runs[i].get("pipelined_step_ms"):
                r["torch_over_jax_pipelined"] = (
                    torch_runs[i]["pipelined_step_ms"] / r["pipelined_step_ms"]
                )
        results.append(r)
        jax.clear_caches()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS"),  # e.g. the GPU script's cuDNN LayerNorm
        "flops_formula": "6*P_tok*B*T + 6*P_seq*B + 12*L*(N*D)*T^2*B (PaLM appendix B)",
        "results": results,
    }
    if _DATA_CONFIG.value:
        report["pipeline"] = _pipeline(_DATA_CONFIG.value)
    print(_policy_table(results) if _POLICIES.value else _table(results))
    for line in filter(None, map(_collectives_line, results)):
        print(line)
    if "pipeline" in report:
        p = report["pipeline"]
        unit = "images" if "images_per_s" in p else "tokens"
        print(
            f"input pipeline ({_DATA_CONFIG.value}): {p['batches_per_s']:.1f} batches/s, "
            f"{p[unit + '_per_s']:.0f} {unit}/s, batch {p['batch_shape']}, "
            f"setup {p['setup_s']:.1f} s"
        )
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
