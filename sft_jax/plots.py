"""Learning curves from a run's ``metrics.jsonl`` as PNG files.

``curves`` turns metric rows into per-metric, per-split series; ``plot_curves`` draws one run
(one panel per metric, training and validation in each); ``plot_comparison`` draws one metric of
several runs in one panel (e.g. a linear probe against full fine-tuning).

Rendering uses ``matplotlib.figure.Figure`` with the Agg canvas directly, never pyplot: no global
figure state, and a user's chosen pyplot backend is left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax.logging import read_metrics

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_STYLE = {  # split -> (colour, marker); training is drawn as a smoothed line instead
    "train": ("C0", None),
    "validation": ("C1", "o"),
    "test": ("C2", "s"),
}
Curves = dict[str, dict[str, tuple[list[int], list[float]]]]


def _is_scalar(v: Any) -> bool:
    # bool is an int subclass but not a metric; NaN/Inf (a skipped update) cannot be drawn
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curves(rows: Sequence[dict]) -> Curves:
    """Per-metric, per-split series of the numeric scalar metrics in ``rows``.

    Args:
      rows: metric rows as written by ``MetricsLogger`` (``{"step", "split", **metrics}``).

    Returns:
      ``{metric: {split: (steps, values)}}`` with steps ascending, for the splits "train",
      "validation" and "test" only (other rows, such as the "data" order hashes, are ignored).
      Non-numeric values (lists, strings, booleans) and non-finite ones are left out. A metric
      logged twice at the same step of a split (a resumed run repeating a step) keeps the value
      of the later row.
    """
    points: dict[str, dict[str, dict[int, float]]] = {}
    for row in rows:
        split = row.get("split")
        if split not in SPLITS or "step" not in row:
            continue
        step = int(row["step"])
        for name, value in row.items():
            if name in ("step", "split"):
                continue
            by_step = points.setdefault(name, {}).setdefault(split, {})
            if _is_scalar(value):
                by_step[step] = float(value)
            else:  # the later row has no usable value for this step: drop the earlier one too
                by_step.pop(step, None)
    out: Curves = {}
    for name, by_split in points.items():
        series = {
            split: (sorted(by_step), [by_step[s] for s in sorted(by_step)])
            for split, by_step in by_split.items()
            if by_step
        }
        if series:
            out[name] = {s: series[s] for s in SPLITS if s in series}
    return out


def smooth(values: Sequence[float]) -> tuple[np.ndarray, int]:
    """Centred moving average of ``values`` whose window grows with their number (about a
    tenth of them, odd, at most 101); the window shrinks at both ends so the curve neither lags
    nor loses its first and last points. Returns the averages and the window."""
    x = np.asarray(values, dtype=np.float64)  # [N]
    half = min(len(x) // 20, 50)
    if half == 0:
        return x, 1
    csum = np.concatenate([[0.0], np.cumsum(x)])  # [N + 1]
    idx = np.arange(len(x))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(x))
    return (csum[hi] - csum[lo]) / (hi - lo), 2 * half + 1


def load_rows(workdir: str | os.PathLike) -> list[dict]:
    """``read_metrics`` of a run directory that must have a ``metrics.jsonl``.

    Raises:
      FileNotFoundError: naming the missing file.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file {path} (is {workdir} a training run directory?)")
    return read_metrics(os.fspath(workdir))


def _steps_per_epoch(workdir: str | os.PathLike) -> int | None:
    path = os.path.join(workdir, "run.json")
    try:
        with open(path) as f:
            spe = json.load(f).get("steps_per_epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return int(spe) if isinstance(spe, (int, float)) and spe > 0 else None


def _new_figure(num_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * num_panels, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, num_panels, squeeze=False)[0]


def _draw(ax, steps: list[int], values: list[float], split: str, label: str, color: str) -> None:
    """One series: training as faint raw points plus a solid moving average; evaluation splits
    as markers joined by a line."""
    if split == "train":
        avg, window = smooth(values)
        if window > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            label = f"{label} (moving avg, {window})"
        ax.plot(steps, avg, color=color, linewidth=1.8, label=label)
    else:
        marker = _STYLE.get(split, (None, "o"))[1]
        ax.plot(steps, values, color=color, marker=marker, markersize=4, linewidth=1.2, label=label)


def _save(fig, out_path: str | os.PathLike) -> str:
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path


def plot_curves(
    workdir_or_rows: str | os.PathLike | Sequence[dict],
    out_path: str | os.PathLike,
    metrics: Sequence[str] = ("loss", "accuracy"),
    title: str | None = None,
) -> str:
    """Writes a PNG of a run's learning curves: one panel per metric in ``metrics`` that the
    run logged, with its training and validation (and test) series.

    Args:
      workdir_or_rows: a run directory holding ``metrics.jsonl`` (and optionally ``run.json``,
        whose ``steps_per_epoch`` adds an epoch axis on top), or the metric rows themselves.
      out_path: PNG to write; missing parent directories are created.
      metrics: metric names to draw, in panel order; names the run did not log are skipped.
      title: figure title; defaults to the run directory's name (none for rows).

    Returns:
      ``out_path``.

    Raises:
      FileNotFoundError: the directory has no ``metrics.jsonl``.
      ValueError: none of ``metrics`` was logged (the message lists those that were).
    """
    spe = None
    if isinstance(workdir_or_rows, (str, os.PathLike)):
        rows = load_rows(workdir_or_rows)
        spe = _steps_per_epoch(workdir_or_rows)
        if title is None:
            title = os.path.basename(os.path.normpath(os.fspath(workdir_or_rows)))
    else:
        rows = list(workdir_or_rows)
    data = curves(rows)
    names = [m for m in metrics if m in data]
    if not names:
        raise ValueError(
            f"none of the metrics {list(metrics)} was logged; logged metrics: {sorted(data)}"
        )
    if len(names) < len(metrics):
        log.info("not logged, skipped: %s", [m for m in metrics if m not in data])
    fig, axes = _new_figure(len(names))
    for ax, name in zip(axes, names):
        for split, (steps, values) in data[name].items():
            _draw(ax, steps, values, split, split, _STYLE[split][0])
        ax.set(title=name, xlabel="step", ylabel=name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        if spe:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
            top.set_xlabel("epoch")
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def plot_comparison(
    runs: dict[str, Sequence[dict]],
    out_path: str | os.PathLike,
    metric: str = "accuracy",
    split: str = "validation",
    title: str | None = None,
) -> str:
    """Writes a PNG with one metric of several runs in one panel.

    Args:
      runs: run name (the legend label) -> that run's metric rows (``read_metrics``).
      out_path: PNG to write; missing parent directories are created.
      metric: the metric to compare.
      split: the split whose series is drawn ("train" series are smoothed as in
        ``plot_curves``).
      title: panel title; defaults to "<split> <metric>".

    Returns:
      ``out_path``.

    Raises:
      ValueError: no run logged ``metric`` on ``split`` (the message lists what was logged).
    """
    series = {name: curves(rows).get(metric, {}).get(split) for name, rows in runs.items()}
    if not any(series.values()):
        logged = sorted(
            {f"{s}/{m}" for rows in runs.values() for m, d in curves(rows).items() for s in d}
        )
        raise ValueError(
            f"no run logged {metric!r} on split {split!r}; logged split/metric pairs: {logged}"
        )
    missing = [name for name, s in series.items() if not s]
    if missing:
        log.warning("runs without %s/%s, left out: %s", split, metric, missing)
    fig, (ax,) = _new_figure(1)
    for i, (name, s) in enumerate(series.items()):
        if s:
            _draw(ax, s[0], s[1], split, name, f"C{i % 10}")
    ax.set(title=title or f"{split} {metric}", xlabel="step", ylabel=metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out_path)
