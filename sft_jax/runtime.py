"""Process-level JAX setup for the command-line entry points: multi-host initialization and the
persistent compilation cache. Call ``setup_runtime`` once, before anything touches a device.

Environment (each overrides the default, config values override the environment):

    SFT_JAX_COMPILATION_CACHE   directory of the persistent XLA cache ("" or "off" disables it;
                                default ~/.cache/sft_jax/xla)
    SFT_JAX_DISTRIBUTED=1       call ``jax.distributed.initialize()`` (auto-detects the cluster
                                on Cloud TPU, SLURM, Open MPI and Kubernetes)
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
                                explicit multi-host settings (read by ``jax.distributed``)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/sft_jax/xla"
_initialized = False


def compilation_cache_dir(configured: str | None = None) -> str | None:
    """The cache directory to use: ``configured``, else the environment, else the default;
    None when disabled ("" / "off")."""
    value = configured if configured else os.environ.get("SFT_JAX_COMPILATION_CACHE", DEFAULT_CACHE)
    if value.strip().lower() in ("", "off", "none", "0"):
        return None
    return os.path.expanduser(value)


def setup_runtime(runtime_cfg: Any = None) -> dict[str, Any]:
    """Initializes multi-host JAX (if asked) and the persistent compilation cache.

    Args:
      runtime_cfg: optional config block with ``distributed`` (bool) and
        ``compilation_cache_dir`` (str); missing keys fall back to the environment.

    Returns:
      What was set up: ``{"distributed": bool, "process": i, "num_processes": n,
      "compilation_cache_dir": str | None}``.
    """
    global _initialized
    get = (lambda k, d: runtime_cfg.get(k, d)) if runtime_cfg is not None else (lambda k, d: d)
    distributed = bool(get("distributed", False)) or os.environ.get("SFT_JAX_DISTRIBUTED") == "1"
    if distributed and not _initialized:
        jax.distributed.initialize()  # coordinator/process ids from env or cluster auto-detection
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
    }
    log.info("runtime: %s", info)
    return info
