"""Process-level JAX setup for the command-line entry points: multi-host initialization, the
persistent compilation cache and the kernel choices. Call ``setup_runtime`` once, before anything
touches a device.

Kernel choices (config ``runtime.*``; each is a speed choice, every option computes the same
function):

    attention    "xla" (default) | "cudnn": fused cuDNN attention on NVIDIA GPUs in bf16/fp16
                 without attention dropout (``attention.attention_implementation``) |
                 "cudnn_packed": the same, packed rows in cuDNN's packed layout instead of a
                 dense segment mask (``sft_jax.models.cudnn_attention``)
    dropout      "threefry" (default) | "hash": how dropout masks are drawn
                 (``dropout.dropout_implementation``; different masks, same distribution)
    cpu_matmul   "xla" (default) | "onednn": XLA CPU's matmuls through oneDNN instead of its
                 default library (``CPU_MATMUL_FLAGS``; the flags are appended to ``XLA_FLAGS``,
                 which XLA reads when the CPU backend starts)
    loss_chunk   0 (default) | positions: a causal LM's loss from its hidden states that many
                 positions at a time, so only one chunk's logits exist at once
                 (``sft_jax.lm_loss``; a memory choice, float sums in another order)
    packed_max_segments
                 16 (default) | M: segments per row that "cudnn_packed" passes as lengths and
                 offsets (1: padded rows, one sequence per row from token 0); a batch with a
                 row it does not describe takes the dense mask (``cudnn_attention``)
    remat        "none" (default) | "full": each block's activations (transformer blocks, ResNet
                 residual layers, EfficientNet MBConv blocks) recomputed in the backward pass
                 from its input instead of kept (``sft_jax.models.remat``; a memory choice:
                 about a third more model FLOPs, the same gradients)

All but cpu_matmul are read while a step is traced (``sft_jax.kernel_choices.Kernels``).

Memory: ``cpu_allocator`` "auto" (default) | "reuse" | "system": whether freed host memory stays
in the process so that XLA CPU's per-step buffer is not faulted in from the OS on every step
(``sft_jax.cpu_allocator``).

Environment (each overrides the default, config values override the environment):

    SFT_JAX_COMPILATION_CACHE   directory of the persistent XLA cache ("" or "off" disables it;
                                default ~/.cache/sft_jax/xla)
    SFT_JAX_DISTRIBUTED=1       call ``jax.distributed.initialize()`` (auto-detects the cluster
                                on Cloud TPU, SLURM, Open MPI and Kubernetes)
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
                                explicit multi-host settings, passed to
                                ``jax.distributed.initialize`` (the config's
                                ``runtime.coordinator_address``, ``num_processes`` and
                                ``process_id`` win); CPU processes talk over gloo
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from sft_jax.cpu_allocator import backends_started, set_cpu_allocator
from sft_jax.kernel_choices import Kernels

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/sft_jax/xla"
_initialized = False
CPU_MATMUL_FLAGS = {
    "xla": "",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
}


def set_cpu_matmul(name: str) -> None:
    """Selects the CPU matmul library (``CPU_MATMUL_FLAGS``) by extending ``XLA_FLAGS``.

    Raises:
      ValueError: an unknown name, or ``onednn`` asked for after the backends started (XLA
        would silently ignore the flags).
    """
    if name not in CPU_MATMUL_FLAGS:
        raise ValueError(f"runtime.cpu_matmul={name!r}; use one of {sorted(CPU_MATMUL_FLAGS)}")
    flags = CPU_MATMUL_FLAGS[name]
    current = os.environ.get("XLA_FLAGS", "")
    if not flags or flags in current:
        return
    if backends_started():
        raise ValueError(f"runtime.cpu_matmul={name!r} must be set before JAX starts a backend")
    os.environ["XLA_FLAGS"] = f"{current} {flags}".strip()


def compilation_cache_dir(configured: str | None = None) -> str | None:
    """The cache directory to use: ``configured``, else the environment, else the default;
    None when disabled ("" / "off")."""
    value = configured if configured else os.environ.get("SFT_JAX_COMPILATION_CACHE", DEFAULT_CACHE)
    if value.strip().lower() in ("", "off", "none", "0"):
        return None
    return os.path.expanduser(value)


def _initialize_distributed(get: Any) -> None:
    """``jax.distributed.initialize`` with the explicit settings from config / environment (None
    where neither gives one: the cluster auto-detection fills them in)."""
    address = get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    explicit = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = get(key, -1)
        value = value if value is not None and value >= 0 else os.environ.get(env)
        explicit[key] = None if value in (None, "") else int(value)
    # CPU processes need a collectives library to talk to each other (GPU/TPU bring their own;
    # the setting only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, **explicit)


def setup_runtime(runtime_cfg: Any = None) -> dict[str, Any]:
    """Initializes multi-host JAX (if asked) and the persistent compilation cache.

    Args:
      runtime_cfg: optional config block with ``distributed`` (bool),
        ``compilation_cache_dir`` (str), ``cpu_allocator`` and the kernel choices
        ``attention``, ``dropout``, ``cpu_matmul``, ``loss_chunk``, ``packed_max_segments``,
        ``remat`` (module doc); missing keys fall back to the environment / defaults.

    Returns:
      What was set up: ``{"distributed": bool, "process": i, "num_processes": n,
      "compilation_cache_dir": str | None, "cpu_allocator": "reuse" | "system", "attention",
      "dropout", "cpu_matmul", "loss_chunk", "packed_max_segments", "remat"}``.
    """
    global _initialized
    get = (lambda k, d: runtime_cfg.get(k, d)) if runtime_cfg is not None else (lambda k, d: d)
    kernels = Kernels.from_config(get)
    cpu_matmul = get("cpu_matmul", "xla")
    allocator = set_cpu_allocator(get("cpu_allocator", "auto"))  # before any backend starts
    set_cpu_matmul(cpu_matmul)
    kernels.set()
    distributed = bool(get("distributed", False)) or os.environ.get("SFT_JAX_DISTRIBUTED") == "1"
    if distributed and not _initialized:
        _initialize_distributed(get)
    _initialized = _initialized or distributed
    cache = compilation_cache_dir(get("compilation_cache_dir", None))
    if cache:
        os.makedirs(cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache)
        # Cache every compilation (the default skips those under 1 s); CPU steps compile in seconds.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    info = {
        "distributed": distributed,
        "process": jax.process_index(),
        "num_processes": jax.process_count(),
        "compilation_cache_dir": cache,
        "cpu_allocator": allocator,
        "cpu_matmul": cpu_matmul,
        **kernels.as_dict(),
    }
    log.info("runtime: %s", info)
    return info
