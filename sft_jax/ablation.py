"""Ablation sweeps: a grid of config variations x seeds, each cell one training run.

A ``Sweep`` (from ``configs/sweeps.py`` or written inline, see ``load_sweep``) has

  ``axes``       ``{config key: [values]}``: the grid is their product, times the seeds;
  ``base``       ``{config key: value}`` applied to every cell (e.g. a shortened training);
  ``overrides``  ``{condition: {config key: value}}`` applied to the cells that match
                 ``condition``: one ``(key, value)`` pair, or a tuple of pairs that must all
                 match, e.g. a learning rate per (freezing preset, optimizer).

A cell's config is built in this order, later wins: the config file; ``base``; the matching
``overrides``, those with fewer conditions first; the cell's swept values and ``seed``; the
command line's ``--config.KEY=VALUE`` flags (which may not name a swept key or ``seed``). Two
overrides with the same number of conditions that set one key to different values in one cell
are an error, as is an override that sets a swept key.

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

import ast
import copy
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import re
import statistics
import time
from typing import Any, Iterable, Sequence

from sft_jax.ablation_cells import CellRunner, SweepInterrupted
from sft_jax.logging import write_atomically

log = logging.getLogger(__name__)

Condition = tuple[tuple[str, Any], ...]

# Columns of results.csv besides the swept keys (``seed`` comes right after those).
COLUMNS = (
    "status", "error", "val_accuracy", "val_macro_f1", "val_loss", "best_val_macro_f1",
    "num_params", "num_trainable_params", "optimizer_state_bytes", "step_time_s",
    "tokens_per_sec", "images_per_sec", "peak_rss_bytes", "rss_start_bytes", "peak_rss_scope",
    "compiled_step_bytes", "wall_s", "workdir", "slug",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid of config variations (see the module docstring)."""

    axes: dict[str, list]
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    overrides: tuple[tuple[Condition, dict[str, Any]], ...] = ()
    name: str = ""

    @classmethod
    def from_dict(cls, spec: dict, name: str = "") -> Sweep:
        """From ``{"axes": ..., "base": ..., "overrides": ...}`` (``configs/sweeps.py``)."""
        unknown = set(spec) - {"axes", "base", "overrides"}
        if unknown or "axes" not in spec:
            raise ValueError(f"sweep {name!r}: want keys axes, base, overrides; got {sorted(spec)}")
        axes = {k: list(v) for k, v in spec["axes"].items()}
        if not axes or any(not v for v in axes.values()):
            raise ValueError(f"sweep {name!r}: every axis needs at least one value: {axes}")
        if "seed" in axes:
            raise ValueError("sweep over seeds with --seeds, not a 'seed' axis")
        overrides = tuple(
            (_condition(cond), dict(values)) for cond, values in spec.get("overrides", {}).items()
        )
        for cond, values in overrides:
            bad = [k for k, _ in cond if k not in axes]
            if bad:
                raise ValueError(f"sweep {name!r}: override condition on unswept key(s) {bad}")
            if set(values) & (set(axes) | {"seed"}):
                raise ValueError(f"sweep {name!r}: override {cond} sets a swept key")
        return cls(axes, dict(spec.get("base", {})), overrides, name)

    def to_dict(self) -> dict:
        """JSON-ready description (``DIR/sweep.json``)."""
        return {
            "name": self.name,
            "axes": self.axes,
            "base": self.base,
            "overrides": [[list(map(list, c)), v] for c, v in self.overrides],
        }


def _condition(cond: Any) -> Condition:
    """``("k", v)`` or ``(("k1", v1), ("k2", v2))`` -> a tuple of pairs."""
    if isinstance(cond, tuple) and len(cond) == 2 and isinstance(cond[0], str):
        return ((cond[0], cond[1]),)
    if isinstance(cond, tuple) and all(isinstance(c, tuple) and len(c) == 2 for c in cond):
        return tuple((str(k), v) for k, v in cond)
    raise ValueError(f"override condition must be (key, value) or ((key, value), ...): {cond!r}")


def parse_value(text: str) -> Any:
    """A Python literal (``1e-3``, ``(32, 64)``, ``True``) or else the string itself."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_inline(text: str) -> Sweep:
    """``"freeze.policy=full,head_only;optimizer.name=adamw,sgd"`` -> a Sweep without base or
    overrides (values are Python literals or strings; a value cannot contain ``,`` or ``;``)."""
    axes = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, values = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"inline sweep part {part!r}: write KEY=V1,V2,...")
        axes[key.strip()] = [parse_value(v) for v in values.split(",") if v.strip()]
    return Sweep.from_dict({"axes": axes}, name=text)


def load_sweep(arg: str, default_file: str = "configs/sweeps.py") -> Sweep:
    """``KEY=V1,V2;...`` (inline), ``NAME`` (``get_sweep(NAME)`` of ``default_file``) or
    ``path/to/file.py:NAME``."""
    if "=" in arg:
        return parse_inline(arg)
    path, colon, name = arg.rpartition(":")
    if not colon or not path.endswith(".py"):
        path, name = default_file, arg
    spec = importlib.util.spec_from_file_location("sft_jax_sweeps", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise AttributeError(f"sweep file {path} defines no get_sweep(name) function")
    return Sweep.from_dict(module.get_sweep(name), name=name)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: swept values, seed, directory name and every config override."""

    values: dict[str, Any]
    seed: int
    slug: str
    overrides: dict[str, Any]


def _slug_part(key: str, value: Any) -> str:
    value = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-") or "x"
    return f"{key.split('.')[-1]}-{value}"


def slug(values: dict[str, Any], seed: int) -> str:
    """A directory name: ``policy-lora-8__name-adamw__seed-0`` (last key component, value;
    characters other than letters, digits and ``._+-`` become ``-``)."""
    return "__".join([*(_slug_part(k, v) for k, v in values.items()), f"seed-{seed}"])


def _first_conflict(setters: list[tuple[Condition, Any]]):
    """The first two ``(condition, value)`` pairs of one layer that set a key differently, or
    None when they all agree."""
    first = setters[0]  # all agree with each other exactly when all agree with the first
    return next(((first, other) for other in setters[1:] if other[1] != first[1]), None)


def cell_overrides(sweep: Sweep, values: dict[str, Any], seed: int) -> dict[str, Any]:
    """Base, then matching overrides (fewer conditions first), then the swept values and seed.

    Within one layer (overrides with the same number of conditions) every override that sets a
    key must agree on its value, whatever their order; a disagreement stands unless a later,
    more specific layer sets the key.

    Raises:
      ValueError: two matching overrides with the same number of conditions set a key to
        different values and no more specific override settles it.
    """
    out, unsettled = dict(sweep.base), {}
    matching = [(c, v) for c, v in sweep.overrides if all(values[k] == x for k, x in c)]
    by_size = itertools.groupby(sorted(matching, key=lambda cv: len(cv[0])), lambda cv: len(cv[0]))
    for _, group in by_size:
        layer: dict[str, list[tuple[Condition, Any]]] = {}
        for cond, settings in group:
            for key, value in settings.items():
                layer.setdefault(key, []).append((cond, value))
        for key, setters in layer.items():
            conflict = _first_conflict(setters)
            if conflict is None:
                unsettled.pop(key, None)  # this layer is more specific: it decides the key
            else:
                unsettled[key] = conflict
            out[key] = setters[-1][1]
    if unsettled:
        key, ((c1, v1), (c2, v2)) = next(iter(unsettled.items()))
        raise ValueError(
            f"overrides {c1} and {c2} set {key} to {v1!r} and {v2!r} in cell {values}: add an "
            "override with both conditions"
        )
    return {**out, **values, "seed": seed}


def expand(sweep: Sweep, seeds: Sequence[int]) -> list[Cell]:
    """The grid in order (first axis slowest, seeds fastest).

    Raises:
      ValueError: no seeds (the grid would have no cell), or two cells share a directory name.
    """
    if not seeds:
        raise ValueError("no seeds: every grid point needs at least one (--seeds >= 1)")
    cells = []
    for combo in itertools.product(*sweep.axes.values()):
        values = dict(zip(sweep.axes, combo))
        for seed in seeds:
            cells.append(
                Cell(values, seed, slug(values, seed), cell_overrides(sweep, values, seed))
            )
    slugs = [c.slug for c in cells]
    if len(set(slugs)) != len(slugs):
        dup = sorted({s for s in slugs if slugs.count(s) > 1})
        raise ValueError(f"sweep values give the same directory name: {dup}")
    return cells


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the (locked) ConfigDict with dotted ``key: value`` assignments; an unknown key
    or a value of the wrong type is an error naming it."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except (KeyError, AttributeError):
            raise ValueError(f"config has no key {key!r}") from None
        except TypeError as e:
            raise ValueError(f"config key {key!r} = {value!r}: {e}") from None
    return cfg


def final_overrides(cell: Cell, cli: dict[str, Any]) -> dict[str, Any]:
    """The cell's overrides followed by the command line's (which may not touch swept keys)."""
    clash = sorted(set(cli) & (set(cell.values) | {"seed"}))
    if clash:
        raise ValueError(f"--config flags set swept key(s) {clash}; change the sweep instead")
    return {**cell.overrides, **cli}


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
