"""Learning-curve PNGs from run directories' metrics.jsonl.

  python -m experiments.plot --workdir DIR [--metrics loss,accuracy] [--out PATH]
  python -m experiments.plot --workdir DIR1 --workdir DIR2 [...] --out PATH [--metrics ...]
      [--split validation]

One workdir: one PNG (default DIR/curves.png) with a panel per metric, training and validation
curves in each. Several workdirs: one comparison PNG per metric with a curve per run (named by
its directory's basename); with one metric it is --out itself, with several --out gets the
metric's name before its extension (curves.png -> curves_loss.png, curves_accuracy.png).
Prints each written path.
"""

import os

from absl import app, flags

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory; repeat to compare runs.")
_METRICS = flags.DEFINE_list("metrics", ["loss", "accuracy"], "Comma list of metrics to draw.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default DIR/curves.png for one workdir).")
_SPLIT = flags.DEFINE_string("split", "validation", "Split compared across several workdirs.")


def _run_names(workdirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    # two runs with the same basename (runs/a/x, runs/b/x) keep their paths to stay apart
    return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs)]


def _compare(workdirs: list[str]) -> list[str]:
    from sft_jax import plots

    if not _OUT.value:
        raise app.UsageError("several --workdir need --out")
    runs = {name: plots.load_rows(w) for name, w in zip(_run_names(workdirs), workdirs)}
    stem, ext = os.path.splitext(_OUT.value)
    written, errors = [], []
    for metric in _METRICS.value:
        out = _OUT.value if len(_METRICS.value) == 1 else f"{stem}_{metric}{ext or '.png'}"
        try:
            written.append(plots.plot_comparison(runs, out, metric=metric, split=_SPLIT.value))
        except ValueError as e:  # one metric no run logged should not stop the others
            errors.append(str(e))
    if not written:
        raise ValueError("; ".join(errors))
    for e in errors:
        print(f"skipped: {e}")
    return written


def main(argv):
    del argv
    workdirs = _WORKDIR.value
    if not workdirs:
        raise app.UsageError("pass --workdir DIR (repeat it to compare runs)")
    if len(workdirs) == 1:
        from sft_jax.plots import plot_curves

        out = _OUT.value or os.path.join(workdirs[0], "curves.png")
        written = [plot_curves(workdirs[0], out, metrics=_METRICS.value)]
    else:
        written = _compare(workdirs)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
