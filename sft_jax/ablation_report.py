"""Summary of an ablation sweep from ``DIR/results.csv`` (see ``sft_jax.ablation``).

``write_report(DIR, keys)`` writes

  ``summary.md``      one row per grid point (the swept values): mean +- std over the seeds that
                      finished of validation accuracy and macro-F1, trainable parameters,
                      optimizer state, step time, peak memory; sorted by mean macro-F1; with
                      two or more swept keys a pivot table (first key x second key) of mean
                      macro-F1; then the failed cells and their errors.
  ``macro_f1_bars.png``     validation macro-F1 per value of the first keys, one bar per value of
                      the last key, error bars one standard deviation over seeds.
  ``learning_curves.png``   training loss vs step, mean over seeds (band: +- std), one panel
                      per value of the first key (read from each cell's ``metrics.jsonl``).
  ``efficiency.png``  macro-F1 vs trainable parameters and vs optimizer-state bytes (log x).

Standard deviations are sample standard deviations (n - 1 in the denominator) over the seeds
that finished; 0 for a single seed. Failed cells are left out of every mean and listed.
Rendering: ``matplotlib.figure.Figure`` on the Agg canvas, never pyplot (as ``sft_jax.plots``).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("val_accuracy", "val_macro_f1", "best_val_macro_f1", "val_loss", "step_time_s",
           "wall_s")  # fmt: skip
SIZES = ("num_trainable_params", "optimizer_state_bytes")  # the same for every seed
PEAKS = ("peak_rss_bytes", "compiled_step_bytes")  # the largest over seeds


def number(value: Any) -> float | None:
    """A finite float from a CSV field or a number; None for empty / non-numeric / NaN."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, sample std)``; std 0.0 for one value; ``(None, None)`` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def group_key(row: dict, keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row.get(k, "")) for k in keys)


def aggregate(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One dict per grid point (first-appearance order): the key values (as text), ``n`` (seeds
    that finished), ``n_total``, ``(mean, std)`` of each of ``METRICS``, the mean of ``SIZES``
    and the max of ``PEAKS``."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row, keys), []).append(row)
    out = []
    for values, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        g: dict[str, Any] = dict(zip(keys, values), n=len(ok), n_total=len(members))
        for m in METRICS:
            g[m] = mean_std([number(r.get(m)) for r in ok])
        for m in SIZES:
            g[m] = mean_std([number(r.get(m)) for r in ok])[0]
        for m in PEAKS:
            present = [x for x in (number(r.get(m)) for r in ok) if x is not None]
            g[m] = max(present) if present else None
        out.append(g)
    return out


def _pm(ms: tuple[float | None, float | None], digits: int = 3) -> str:
    mean, std = ms
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(x: float | None, scale: float = 1.0, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x / scale)


def _bytes(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e3:.1f} kB" if x < 1e6 else f"{x / 1e6:,.1f} MB"


def _sort_key(g: dict) -> float:
    mean = g["val_macro_f1"][0]
    return -mean if mean is not None else math.inf


def summary_table(groups: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """Markdown table lines, sorted by mean macro-F1 (best first)."""
    head = [*keys, "seeds", "val accuracy", "val macro-F1", "trainable params",
            "optimizer state", "step s", "peak RSS MB", "compiled step MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in sorted(groups, key=_sort_key):
        cells = [*(f"`{g[k]}`" for k in keys), f"{g['n']}/{g['n_total']}",
                 _pm(g["val_accuracy"]), _pm(g["val_macro_f1"]),
                 _num(g["num_trainable_params"]), _bytes(g["optimizer_state_bytes"]),
                 _num(g["step_time_s"][0], 1.0, "{:.2f}"), _num(g["peak_rss_bytes"], 1e6),
                 _num(g["compiled_step_bytes"], 1e6)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pivot_table(rows: Sequence[dict], row_key: str, col_key: str) -> list[str]:
    """Markdown lines: mean +- std macro-F1 of the ok cells per (row value, column value),
    pooling every other key and the seeds; the best of each row in bold."""
    ok = [r for r in rows if r.get("status") == "ok"]
    row_vals = list(dict.fromkeys(str(r.get(row_key)) for r in rows))
    col_vals = list(dict.fromkeys(str(r.get(col_key)) for r in rows))
    lines = [f"| {row_key} \\ {col_key} | " + " | ".join(f"`{c}`" for c in col_vals) + " |",
             "|" + "---|" * (len(col_vals) + 1)]  # fmt: skip
    for rv in row_vals:
        stats = []
        for cv in col_vals:
            vals = [number(r.get("val_macro_f1")) for r in ok
                    if str(r.get(row_key)) == rv and str(r.get(col_key)) == cv]  # fmt: skip
            stats.append(mean_std(vals))
        best = max((m for m, _ in stats if m is not None), default=None)
        cells = [f"**{_pm(s)}**" if s[0] is not None and s[0] == best else _pm(s) for s in stats]
        lines.append(f"| `{rv}` | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(rows: Sequence[dict], keys: Sequence[str], title: str = "") -> str:
    """The whole ``summary.md`` text."""
    groups = aggregate(rows, keys)
    ok = sum(r.get("status") == "ok" for r in rows)
    out = [f"# Ablation{': ' + title if title else ''}", "",
           f"{len(rows)} cells, {ok} finished, {len(rows) - ok} failed. Mean ± sample std over "
           "seeds of the final validation metrics; sorted by mean macro-F1.", ""]  # fmt: skip
    out += summary_table(groups, keys)
    if len(keys) >= 2:
        pooled = f" (pooled over {', '.join(keys[2:])} and seeds)" if len(keys) > 2 else ""
        out += ["", f"## Mean validation macro-F1: {keys[0]} x {keys[1]}{pooled}", ""]
        out += pivot_table(rows, keys[0], keys[1])
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        out += ["", "## Failed cells", ""]
        out += [f"- `{r.get('slug')}`: {r.get('error', '')}" for r in failed]
    out += ["", "Columns: optimizer state = bytes of the optimizer's state arrays (`run.json`); "
            "step s = 1 / median logged training steps/s; peak RSS = the training process's peak "
            "resident memory during the cell (see `sft_jax/ablation_cells.py` for its scope); "
            "compiled step = XLA's memory analysis of the train step at the run's widest batch "
            "(arguments + outputs + temporaries - donated), per device.", ""]  # fmt: skip
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(ncols: int, width: float = 5.5, height: float = 4.2, sharey: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False, sharey=sharey)[0]


def _save(fig, path: str) -> str:
    fig.savefig(path, format="png")
    return path


def _label(g: dict, keys: Sequence[str]) -> str:
    return ", ".join(str(g[k]) for k in keys) or "all"


def plot_bars(groups: Sequence[dict], keys: Sequence[str], out_path: str) -> str:
    """Mean macro-F1 bars: x = values of ``keys[:-1]``, one bar per value of ``keys[-1]``."""
    outer, hue = list(keys[:-1]), keys[-1]
    xs = list(dict.fromkeys(_label(g, outer) for g in groups))
    hues = list(dict.fromkeys(str(g[hue]) for g in groups))
    fig, (ax,) = _figure(1, width=max(6.0, 1.4 * len(xs) * max(1, len(hues)) / 2))
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        by_x = {_label(g, outer): g["val_macro_f1"] for g in groups if str(g[hue]) == h}
        mean = [by_x.get(x, (None, None))[0] for x in xs]
        std = [by_x.get(x, (None, None))[1] for x in xs]
        pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
        ax.bar(pos, [np.nan if m is None else m for m in mean], width,
               yerr=[0.0 if s is None else s for s in std], capsize=3, label=h,
               color=f"C{j % 10}")  # fmt: skip
    ax.set_xticks(np.arange(len(xs)), xs)
    ax.set(ylabel="validation macro-F1", xlabel=", ".join(outer) or None,
           title="validation macro-F1 (mean ± std over seeds)")  # fmt: skip
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title=hue, fontsize="small")
    return _save(fig, out_path)


def _mean_curve(series: Sequence[tuple[list[int], list[float]]]):
    """Steps logged by every seed, and the mean and std of the values there."""
    common = sorted(set.intersection(*(set(s) for s, _ in series)))
    stacked = np.array([[dict(zip(s, v))[t] for t in common] for s, v in series])  # [S, N]
    return np.array(common), stacked.mean(0), stacked.std(0, ddof=1) if len(series) > 1 else None


def plot_learning_curves(
    rows: Sequence[dict], keys: Sequence[str], workdir: str, out_path: str
) -> str | None:
    """Training loss (mean over seeds) vs step; a panel per value of ``keys[0]`` when there are
    two or more keys. None when no cell has a readable ``metrics.jsonl``."""
    from sft_jax.logging import read_metrics
    from sft_jax.plots import curves

    panel_key = keys[0] if len(keys) >= 2 else None
    line_keys = list(keys[1:]) if panel_key else list(keys)
    series: dict[tuple[str, str], list] = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("workdir"):
            continue
        loss = curves(read_metrics(os.path.join(workdir, r["workdir"]))).get("loss", {})
        if "train" in loss:
            panel = str(r.get(panel_key)) if panel_key else ""
            series.setdefault((panel, _label(r, line_keys)), []).append(loss["train"])
    if not series:
        return None
    panels = list(dict.fromkeys(p for p, _ in series))
    lines = list(dict.fromkeys(line for _, line in series))
    fig, axes = _figure(len(panels), width=4.5, sharey=True)
    for ax, panel in zip(axes, panels):
        for j, line in enumerate(lines):
            if (panel, line) not in series:
                continue
            steps, mean, std = _mean_curve(series[(panel, line)])
            ax.plot(steps, mean, color=f"C{j % 10}", label=line, linewidth=1.6)
            if std is not None:
                ax.fill_between(steps, mean - std, mean + std, color=f"C{j % 10}", alpha=0.15)
        ax.set(title=f"{panel_key} = {panel}" if panel_key else "", xlabel="step",
               ylabel="training loss")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", title=", ".join(line_keys))
    return _save(fig, out_path)


def plot_efficiency(groups: Sequence[dict], keys: Sequence[str], out_path: str) -> str:
    """Mean macro-F1 (error bars: std) vs trainable parameters and vs optimizer-state bytes,
    both on log axes; colour = value of ``keys[-1]``, marker = value of ``keys[0]``."""
    hue, shape = keys[-1], keys[0] if len(keys) >= 2 else None
    hues = list(dict.fromkeys(str(g[hue]) for g in groups))
    shapes = list(dict.fromkeys(str(g[shape]) for g in groups)) if shape else [""]
    markers = "osD^vP*Xh<>"
    fig, axes = _figure(2)
    for ax, x_key, x_label in (
        (axes[0], "num_trainable_params", "trainable parameters"),
        (axes[1], "optimizer_state_bytes", "optimizer state (bytes)"),
    ):
        xs = []
        for g in groups:
            x, (y, err) = g[x_key], g["val_macro_f1"]
            if x is None or y is None:
                continue
            xs.append(x)
            marker = markers[shapes.index(str(g[shape])) % len(markers)] if shape else "o"
            ax.errorbar([x], [y], yerr=[err], fmt=marker, capsize=3, markersize=7,
                        color=f"C{hues.index(str(g[hue])) % 10}")  # fmt: skip
        ax.set_xscale("log" if xs and min(xs) > 0 else "symlog")
        ax.set(xlabel=x_label + " (log)", ylabel="validation macro-F1")
        ax.grid(True, which="both", alpha=0.3)
    for j, h in enumerate(hues):  # legends: colour per last key, marker per first key
        axes[0].plot([], [], "o", color=f"C{j % 10}", label=f"{hue}={h}")
    for i, s in enumerate(shapes if shape else []):
        axes[0].plot([], [], markers[i % len(markers)], color="0.4", label=f"{shape}={s}")
    axes[0].legend(fontsize="small")
    fig.suptitle("macro-F1 vs size (mean ± std over seeds)")
    return _save(fig, out_path)


def write_report(workdir: str, keys: Sequence[str], title: str = "") -> dict[str, str]:
    """Writes ``summary.md`` and the PNGs from ``DIR/results.csv``; returns their paths."""
    from sft_jax.ablation import read_results

    rows = read_results(workdir)
    if not rows:
        raise FileNotFoundError(f"no results in {os.path.join(workdir, 'results.csv')}")
    out = {"summary": os.path.join(workdir, "summary.md")}
    with open(out["summary"], "w") as f:
        f.write(summary_markdown(rows, keys, title))
    groups = aggregate(rows, keys)
    if any(g["n"] for g in groups):
        out["bars"] = plot_bars(groups, keys, os.path.join(workdir, "macro_f1_bars.png"))
        out["efficiency"] = plot_efficiency(groups, keys, os.path.join(workdir, "efficiency.png"))
        curves_path = os.path.join(workdir, "learning_curves.png")
        if plot_learning_curves(rows, keys, workdir, curves_path):
            out["curves"] = curves_path
    return out
