"""How the process hands memory back to the OS: ``runtime.cpu_allocator``.

XLA's CPU executable allocates one temporary buffer per execution for all of a step's
intermediates (1.4 GB for the MiniLM-L6 32 x 128 train step) and frees it after. glibc serves
a block that large with ``mmap`` and returns it with ``munmap``, so every step faults the whole
buffer in again page by page, with the kernel zeroing each page: ~340k page faults and ~0.5 s of
system time per MiniLM step on the project's 2-core machine. PyTorch's eager step frees many
tensors of at most tens of MB, which glibc's adaptive ``mmap`` threshold soon serves from the
heap, so it does not pay this.

``reuse`` keeps freed memory in the process instead: ``mallopt(M_MMAP_MAX, 0)`` serves large
blocks from the heap and ``mallopt(M_TRIM_THRESHOLD, -1)`` never shrinks it, and CPU
computations run inline on the calling thread (``jax_cpu_enable_async_dispatch=False``): a
worker thread's glibc arena would still ``mmap`` blocks over 64 MB, the main thread's arena
does not. The step's buffer is then faulted in once and reused. The process keeps its peak
memory until it exits. The same settings go into the environment (glibc's ``MALLOC_*_``
variables, ``JAX_CPU_ENABLE_ASYNC_DISPATCH``) for the child processes it starts.

    auto     (default) ``reuse`` when no accelerator plugin (CUDA, ROCm, TPU) is installed or
             ``JAX_PLATFORMS`` starts with ``cpu``, and only while no JAX backend has started;
             ``system`` otherwise
    reuse    as above; an error on a non-glibc system or after a backend started
    system   glibc's and JAX's defaults
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os

import jax

log = logging.getLogger(__name__)

CPU_ALLOCATORS = ("auto", "reuse", "system")
# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# For child processes: glibc reads these at start-up, JAX reads its flag at import.
REUSE_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**63 - 1),
    "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false",
}
_ACCELERATOR_PACKAGES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
_applied = False  # reuse is in effect in this process (a second call keeps it)


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (it has ``mallopt``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def _accelerator_installed() -> bool:
    """Whether JAX may pick an accelerator: ``JAX_PLATFORMS`` names another platform first, or
    (when it is unset) a CUDA, ROCm or TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return not platforms.startswith("cpu")
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().startswith(_ACCELERATOR_PACKAGES) for n in names)


def backends_started() -> bool:
    """Whether JAX has started its backends (XLA flags and client options are fixed then)."""
    from jax._src import xla_bridge  # private: no public "are the backends up?" query

    return xla_bridge.backends_are_initialized()


def set_cpu_allocator(name: str) -> str:
    """Applies ``runtime.cpu_allocator`` ``name`` (module doc); returns what is in effect,
    ``"reuse"`` or ``"system"``.

    Raises:
      ValueError: an unknown name, or ``reuse`` asked for on a system without glibc or after a
        JAX backend started (computations would keep running on a worker thread).
    """
    global _applied
    if name not in CPU_ALLOCATORS:
        raise ValueError(f"runtime.cpu_allocator={name!r}; use one of {list(CPU_ALLOCATORS)}")
    if name == "system":
        return "system"
    if _applied:
        return "reuse"
    libc = _glibc()
    problem = (
        "needs glibc (Linux)" if libc is None
        else "must be set before JAX starts a backend" if backends_started()
        else None
    )  # fmt: skip
    if name == "auto" and (problem or _accelerator_installed()):
        return "system"
    if problem:
        raise ValueError(f"runtime.cpu_allocator='reuse' {problem}")
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    os.environ.update(REUSE_ENV)
    _applied = True
    log.info("cpu_allocator: freed memory stays in the process, CPU computations run inline")
    return "reuse"
