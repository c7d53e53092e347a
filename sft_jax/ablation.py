"""Ablation sweeps: run a sweep's cells, each one training run, and collect their results.

The grid, its overrides and the order in which a cell's config is built are ``sft_jax.sweep``.

``run_sweep`` trains the cells in ``DIR/cells/<slug>/`` one after another, in this process
(``ablation_cells.run_cell_in_process``) or each in its own ``python -m experiments.train``
(``ablation_cells.subprocess_runner``), writes ``DIR/cells/<slug>/result.json`` and rewrites
``DIR/results.csv`` after every cell. A cell whose result exists is not run again (resumable); a
half-finished cell resumes from its own checkpoint; a cell that raises (e.g. diverges:
``NonFiniteError``) is recorded with ``status=failed`` and the error, and the sweep goes on.

Columns of ``results.csv`` (and each ``result.json``): the swept keys, ``seed``, ``status``
(``ok`` / ``failed``), ``error``, final validation ``val_accuracy`` / ``val_macro_f1`` /
``val_loss``, ``best_val_macro_f1`` over the run's evaluations, ``num_params``,
``num_trainable_params`` and ``optimizer_state_bytes`` (the run's ``run.json``), ``step_time_s``
(1 / median logged ``steps_per_sec``), ``tokens_per_sec`` or, for image tasks,
``images_per_sec`` (median), the memory fields of
``sft_jax.ablation_cells`` (``peak_rss_bytes``, ``rss_start_bytes``, ``peak_rss_scope``,
``compiled_step_bytes``), ``wall_s`` (the cell's last attempt: build, compile, train, evaluate,
save), ``workdir`` (``cells/<slug>``, relative to DIR) and ``slug``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from typing import Any, Iterable, Sequence

from sft_jax.ablation_cells import CellRunner, SweepInterrupted
from sft_jax.logging import write_atomically
from sft_jax.sweep import Cell, Sweep, apply_overrides, expand, final_overrides

log = logging.getLogger(__name__)

# Columns of results.csv besides the swept keys (``seed`` comes right after those).
COLUMNS = (
    "status", "error", "val_accuracy", "val_macro_f1", "val_loss", "best_val_macro_f1",
    "num_params", "num_trainable_params", "optimizer_state_bytes", "step_time_s",
    "tokens_per_sec", "images_per_sec", "peak_rss_bytes", "rss_start_bytes", "peak_rss_scope",
    "compiled_step_bytes", "wall_s", "workdir", "slug",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# One cell: results from its directory


def _median(values: Iterable[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def _max(values: Iterable[float]) -> float | None:
    """The largest number among ``values`` (others ignored); None when there is none, e.g. the
    macro-F1 of a causal-LM run, whose validation logs loss, perplexity and token accuracy."""
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def summarize_cell(cell_dir: str) -> dict:
    """Final / best validation metrics, sizes (``run.json``) and median training speed of a
    finished run. ``step_time_s`` is 1 / median ``steps_per_sec`` over the logged intervals (the
    first interval includes compilation; the median leaves it out). Metrics the task does not
    log (macro-F1 of a causal LM) are None, not a failure of the cell."""
    from sft_jax.logging import read_metrics

    rows = read_metrics(cell_dir)
    val = [r for r in rows if r.get("split") == "validation"]
    train = [r for r in rows if r.get("split") == "train"]
    if not val:
        raise RuntimeError(f"{cell_dir}: the run logged no validation metrics")
    last = val[-1]
    sps = _median(r.get("steps_per_sec") for r in train)
    out = {
        "val_accuracy": last.get("accuracy"),
        "val_macro_f1": last.get("macro_f1"),
        "val_loss": last.get("loss"),
        "best_val_macro_f1": _max(r.get("macro_f1") for r in val),
        "step_time_s": 1.0 / sps if sps else None,
        "tokens_per_sec": _median(r.get("tokens_per_sec") for r in train),
        "images_per_sec": _median(r.get("images_per_sec") for r in train),  # image tasks
    }
    with open(os.path.join(cell_dir, "run.json")) as f:
        info = json.load(f)
    out.update({k: info.get(k) for k in ("num_params", "num_trainable_params",
                                         "optimizer_state_bytes")})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The sweep


def result_columns(keys: Sequence[str]) -> list[str]:
    return [*keys, "seed", *COLUMNS]


def read_results(workdir: str) -> list[dict]:
    """Rows of ``DIR/results.csv`` as strings (empty when there is none)."""
    import csv

    path = os.path.join(workdir, "results.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(workdir: str, keys: Sequence[str], rows: Sequence[dict]) -> str:
    """Writes ``DIR/results.csv`` atomically (one row per cell, grid order)."""
    import csv

    def write(f):
        writer = csv.DictWriter(f, result_columns(keys), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    path = os.path.join(workdir, "results.csv")
    write_atomically(path, write, newline="")
    return path


@dataclasses.dataclass
class SweepResult:
    """Every grid cell's row (grid order) and the slugs trained / skipped in this call."""

    rows: list[dict]
    ran: list[str]
    skipped: list[str]


def _read_result(path: str) -> dict | None:
    """A cell's ``result.json``; None when it is missing or damaged (a process killed while
    writing it, before writes were atomic): the cell then counts as not finished and runs again,
    resuming from its checkpoint, rather than stopping the whole sweep."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            row = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s); its cell runs again", path, e)
        return None
    if not isinstance(row, dict):
        log.warning("%s holds no result row; its cell runs again", path)
        return None
    return row


def _known_results(workdir: str, cells: Sequence[Cell]) -> dict[str, dict]:
    """Rows of the finished or failed cells by slug: ``results.csv``, then each readable
    ``cells/<slug>/result.json`` (which wins)."""
    known = {r.get("slug"): r for r in read_results(workdir)}
    for cell in cells:
        row = _read_result(os.path.join(workdir, "cells", cell.slug, "result.json"))
        if row is not None:
            known[cell.slug] = row
    return known


def _run_cell(cfg: Any, cell: Cell, overrides: dict, workdir: str, runner: CellRunner) -> dict:
    cell_dir = os.path.join(workdir, "cells", cell.slug)
    os.makedirs(cell_dir, exist_ok=True)
    row = {**cell.values, "seed": cell.seed, "slug": cell.slug,
           "workdir": os.path.join("cells", cell.slug)}  # fmt: skip
    start = time.time()
    try:
        extra = runner(cfg, overrides, cell_dir)
        row.update(summarize_cell(cell_dir), **extra, status="ok", error="")
    except (SweepInterrupted, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001  (a failed cell is a result; the sweep goes on)
        log.error("cell %s failed: %s: %s", cell.slug, type(e).__name__, e)
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:1000])
    row["wall_s"] = time.time() - start
    # Atomically: a kill leaves either no result or a whole one.
    write_atomically(os.path.join(cell_dir, "result.json"), lambda f: json.dump(row, f, indent=2))
    return row


def run_sweep(
    cfg: Any,
    sweep: Sweep,
    seeds: Sequence[int],
    workdir: str,
    runner: CellRunner | None = None,
    cli_overrides: dict[str, Any] | None = None,
    retry_failed: bool = False,
    keep_checkpoints: bool = False,
) -> SweepResult:
    """Trains every cell without a result yet, one after another; see the module docstring.

    Args:
      cfg: The experiment's ConfigDict (the config file, command-line flags applied).
      sweep: The grid.
      seeds: Seeds of every grid point (config key ``seed``).
      workdir: Sweep directory: ``results.csv``, ``sweep.json``, ``cells/<slug>/``.
      runner: ``runner(cfg, overrides, cell_dir) -> extra fields``; default
        ``run_cell_in_process``.
      cli_overrides: The command line's ``--config.KEY=VALUE`` values (applied last).
      retry_failed: Run cells recorded as failed again (they resume from their checkpoint;
        delete ``cells/<slug>`` to start one over).
      keep_checkpoints: Keep a finished cell's ``checkpoints/`` (default: deleted, only the
        metrics stay; a full MiniLM checkpoint with AdamW state is ~270 MB).

    Raises:
      ValueError: before anything trains, when some cell's config is invalid.
    """
    import shutil

    if runner is None:
        from sft_jax.ablation_cells import run_cell_in_process as runner
    cells = expand(sweep, seeds)
    cli = dict(cli_overrides or {})
    plans = [(c, final_overrides(c, cli)) for c in cells]
    configs = [apply_overrides(cfg, o) for _, o in plans]  # every cell checked before training
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({**sweep.to_dict(), "seeds": list(seeds), "cli_overrides": cli}, f, indent=2,
                  default=repr)  # fmt: skip
    known = _known_results(workdir, cells)
    ran, skipped = [], []
    for i, ((cell, overrides), cell_cfg) in enumerate(zip(plans, configs), start=1):
        prev = known.get(cell.slug)
        if prev is not None and (prev.get("status") == "ok" or not retry_failed):
            skipped.append(cell.slug)
            continue
        log.info("cell %d/%d: %s", i, len(cells), cell.slug)
        row = _run_cell(cell_cfg, cell, overrides, workdir, runner)
        known[cell.slug] = row
        ran.append(cell.slug)
        if row["status"] == "ok" and not keep_checkpoints:
            shutil.rmtree(os.path.join(workdir, "cells", cell.slug, "checkpoints"), True)
        log.info("cell %s: %s macro_f1=%s (%.0f s)", cell.slug, row["status"],
                 row.get("val_macro_f1"), row["wall_s"])  # fmt: skip
        write_results(workdir, list(sweep.axes), [known[c.slug] for c in cells if c.slug in known])
    rows = [known[c.slug] for c in cells if c.slug in known]
    write_results(workdir, list(sweep.axes), rows)
    return SweepResult(rows, ran, skipped)
