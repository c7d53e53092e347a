"""How one ablation cell is trained, and the memory it used (see ``sft_jax.ablation``).

A cell runner is ``runner(cfg, overrides, cell_dir) -> extra row fields``: it trains the run in
``cell_dir`` (``cfg`` is the cell's config, ``overrides`` the flat ``{key: value}`` that made it
from the config file) and raises on failure. ``run_cell_in_process`` uses ``Trainer`` in this
process; ``subprocess_runner`` runs ``python -m experiments.train`` per cell.

Memory fields:

  ``peak_rss_bytes``  peak resident memory of the process that trained the cell. In-process on
      Linux the kernel's high-water mark is reset before the cell (``/proc/self/clear_refs``),
      so this is the process's peak *during* the cell, which includes what the process already
      held when the cell started (``rss_start_bytes``: the Python heap, imported libraries,
      allocator caches, ...). Where the reset is impossible it is ``ru_maxrss``, the process's
      running maximum. ``peak_rss_scope`` says which: ``cell``, ``process`` or ``subprocess``
      (``--subprocess``: the training process's own peak, from ``os.wait4``).
  ``compiled_step_bytes``  XLA's memory analysis of the compiled train step at the widest batch
      the run trained on (in-process, ``jit`` mode only): arguments + outputs + temporaries -
      aliased (donated) buffers, per device. The step's working set (parameters, optimizer state,
      batch, gradients, activations), not the data pipeline, the evaluation step or checkpoint
      copies.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

CellRunner = Callable[[Any, dict, str], dict]


# ---------------------------------------------------------------------------------------------
# Peak memory of this process


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _kb_bytes(kb: int | None) -> int | None:
    return None if kb is None else kb * 1024


class PeakRSS:
    """Peak resident memory of this process over a ``with`` block (see the module docstring)."""

    def __enter__(self) -> PeakRSS:
        self.scope = "process"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset the high-water mark to the current RSS
            self.scope = "cell" if _proc_status_kb("VmHWM") is not None else "process"
        except OSError:
            pass
        self.start_bytes = _kb_bytes(_proc_status_kb("VmRSS"))
        return self

    def __exit__(self, *exc) -> None:
        import resource

        kb = _proc_status_kb("VmHWM") if self.scope == "cell" else None
        if kb is None:  # ru_maxrss: kilobytes on Linux
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # The kernel's RSS counters are cached per thread and lag by a few pages, so the reset
        # high-water mark can read below the RSS read just after the reset (seen: 4 KiB). The
        # peak is at least what the process held at the start and at the end.
        held = [b for b in (self.start_bytes, _kb_bytes(_proc_status_kb("VmRSS"))) if b]
        self.peak_bytes = max([int(kb) * 1024, *held])

    def fields(self) -> dict:
        return {"peak_rss_bytes": self.peak_bytes, "rss_start_bytes": self.start_bytes,
                "peak_rss_scope": self.scope}  # fmt: skip


class SweepInterrupted(Exception):
    """A cell stopped early (SIGINT / SIGTERM) with a checkpoint: the sweep stops; run it again
    to resume."""


def compiled_step_memory(trainer: Any) -> int | None:
    """Bytes of XLA's memory analysis of the trainer's compiled train step at the widest batch of
    the run (text: the longest length bucket among its batches): arguments + outputs +
    temporaries - aliased (donated) buffers, per device. None for the pmap runner or a backend
    without the analysis. Call it after ``run()``: jit's compilation cache is shared with
    ``lower().compile()``, so the analysis reuses the step the run compiled."""
    import jax

    from sft_jax import sharding as sharding_lib

    fn = getattr(trainer.runner, "step_fn", None)
    if trainer.mode != "jit" or not hasattr(fn, "lower"):
        return None
    widest = trainer._batch(0)
    if "input_ids" in widest:  # length buckets: scanning the run's batches is cheap (no model)
        for step in range(1, trainer.total_steps):
            batch = trainer._batch(step)
            if batch["input_ids"].shape[1] > widest["input_ids"].shape[1]:
                widest = batch
    sharding = trainer.setup.batch_sharding
    rows = sharding_lib.global_rows(sharding, len(next(iter(widest.values()))))
    abstract = jax.tree.map(  # the global batch (a process builds only its rows)
        lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype, sharding=sharding), widest
    )
    m = fn.lower(trainer.state, abstract).compile().memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )  # fmt: skip


def run_cell_in_process(cfg: Any, overrides: dict, cell_dir: str) -> dict:
    """Trains one cell with ``Trainer`` in this process, then frees what it held (the trainer,
    JAX's compilation caches; the persistent compilation cache stays)."""
    del overrides  # already in cfg
    import gc

    import jax

    from sft_jax.trainer import Trainer

    with PeakRSS() as peak:
        trainer = Trainer(cfg, cell_dir)
        try:
            final = trainer.run()
            compiled = compiled_step_memory(trainer)
        finally:
            trainer.mngr.close()
            del trainer
            gc.collect()
            jax.clear_caches()
            _release_heap()
    if final.get("preempted"):
        raise SweepInterrupted(f"{cell_dir} stopped early; run the sweep again to resume")
    return {**peak.fields(), "compiled_step_bytes": compiled}


def _release_heap() -> None:
    """Returns freed C heap to the OS (glibc ``malloc_trim``), so that the next cell starts from
    a lower resident size; a no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def flag_value(value: Any) -> str:
    """A ``--config.KEY=VALUE`` text that ml_collections parses back to ``value``."""
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def wait_forwarding_sigterm(proc: Any) -> tuple[int, Any]:
    """Waits for the child ``proc`` (``os.wait4``); returns its exit code and resource usage.

    A SIGTERM sent to this process alone (a scheduler preempting the sweep) is passed on to the
    child meanwhile, so the cell's training checkpoints and stops as preempted, rather than this
    process dying and leaving the child training on, orphaned (a rerun of the sweep would then
    start a second trainer in the same cell directory). Outside the main thread, where Python
    cannot install signal handlers, it only waits."""
    import signal
    import threading

    forward = threading.current_thread() is threading.main_thread()
    if forward:
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # retried after the handler runs (PEP 475)
    finally:
        if forward:  # (None: a handler installed outside Python; the default then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return os.waitstatus_to_exitcode(status), usage


def subprocess_runner(config_spec: str, cwd: str | None = None) -> CellRunner:
    """A runner that trains each cell with ``python -m experiments.train --config config_spec``
    plus the cell's overrides as flags, in ``cwd`` (the repository root). Its output goes to
    ``cell_dir/train.log``; its peak RSS is the child's own (``os.wait4``)."""
    import subprocess
    import sys

    def run(cfg: Any, overrides: dict, cell_dir: str) -> dict:
        del cfg
        cmd = [sys.executable, "-m", "experiments.train", "--config", config_spec,
               "--workdir", os.path.abspath(cell_dir)]  # fmt: skip
        cmd += [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]
        out_path = os.path.join(cell_dir, "train.stdout")
        with open(out_path, "wb") as out, open(os.path.join(cell_dir, "train.log"), "ab") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
            try:
                code, usage = wait_forwarding_sigterm(proc)
            except KeyboardInterrupt:  # the child got the SIGINT too: let it checkpoint
                proc.wait()
                raise
            proc.returncode = code
        if code != 0:
            with open(os.path.join(cell_dir, "train.log"), errors="replace") as f:
                tail = f.read()[-800:]
            raise RuntimeError(f"experiments.train exited with status {code}: ...{tail}")
        with open(out_path) as f:
            lines = [line for line in f if line.startswith("{")]
        if lines and json.loads(lines[-1]).get("preempted"):
            raise SweepInterrupted(f"{cell_dir} stopped early; run the sweep again to resume")
        return {"peak_rss_bytes": usage.ru_maxrss * 1024, "rss_start_bytes": None,
                "peak_rss_scope": "subprocess", "compiled_step_bytes": None}  # fmt: skip

    return run
