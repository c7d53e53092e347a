"""Run logging: ``metrics.jsonl`` (one JSON object per line), TensorBoard events, the run files
(``config.json``, ``run.json``), progress bar.

In a multi-host run only process 0 writes (``is_writer``); the others compute the same rows.
"""

from __future__ import annotations

import json
import logging as pylog
import math
import os
import sys
from typing import IO, Any, Callable

import numpy as np

log = pylog.getLogger(__name__)


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0 of a multi-host run (each
    process holds the same metrics; one copy of each row, and no two processes replacing one
    file)."""
    import jax

    return jax.process_index() == 0


def write_run_files(cfg: Any, workdir: str, info: dict) -> None:
    """``config.json`` of the ``ml_collections`` config ``cfg`` (warning on keys that changed
    since a previous run) and ``run.json``."""
    if not is_writer():
        return
    path = os.path.join(workdir, "config.json")
    new = json.loads(cfg.to_json())
    if os.path.exists(path):
        with open(path) as f:
            old = _flat(json.load(f))
        flat = _flat(new)
        changed = sorted(k for k in set(old) | set(flat) if old.get(k) != flat.get(k))
        if changed:
            log.warning("config differs from the previous run in %s: %s", workdir, changed)
    with open(path, "w") as f:
        json.dump(new, f, indent=2)
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump(info, f, indent=2)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


class MetricsLogger:
    """Appends ``{"step", "split", **metrics}`` lines to ``workdir/metrics.jsonl`` and mirrors
    scalar metrics to TensorBoard under ``workdir/tb``.

    ``purge_step``: TensorBoard drops the events of earlier writers at this step and after (a
    resumed run's, as ``truncate_after`` drops their rows)."""

    def __init__(self, workdir: str, tensorboard: bool = True, purge_step: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._writes = is_writer()
        if tensorboard and self._writes:
            from tensorboardX import SummaryWriter  # lazy: only the trainer needs it

            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self._writes:
            return
        row = {"step": int(step), "split": split}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``workdir/metrics.jsonl``. A cut-off last line (a process killed while
    writing it) is dropped; a damaged line before the last one is an error naming it."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i != lines[-1][0]:
                raise ValueError(f"{path}, line {i}: not a JSON row ({e.msg})") from None
    return rows


def write_atomically(path: str, write: Callable[[IO[str]], None], **open_kw: Any) -> None:
    """Writes ``path`` through ``write(file)`` into a temporary file that then replaces it in
    one rename: a kill or Ctrl-C in the middle leaves the old file (or none) whole, never a
    part of the new one."""
    with open(path + ".tmp", "w", **open_kw) as f:
        write(f)
    os.replace(path + ".tmp", path)


def truncate_after(workdir: str, step: int) -> None:
    """Drops rows past ``step`` (written after the checkpoint a resumed run starts from), so a
    resumed run's log equals an uninterrupted one.

    Written atomically (``write_atomically``): a kill or Ctrl-C in the middle leaves the old
    log whole, never a log cut short."""
    if not is_writer():
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= step]
    write_atomically(
        os.path.join(workdir, "metrics.jsonl"),
        lambda f: f.writelines(json.dumps(r) + "\n" for r in rows),
    )


def setup_cli_logging() -> None:
    """INFO for this package's messages; libraries (Orbax, absl) only at WARNING and above."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = pylog.getLogger("sft_jax")
    if not logger.handlers:
        handler = pylog.StreamHandler(sys.stderr)
        handler.setFormatter(pylog.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(pylog.INFO)
    logger.propagate = False


def progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not sys.stderr.isatty() and os.environ.get("SFT_JAX_PROGRESS") != "1",
    )
