"""Ablation sweep: a grid of config variations x seeds, one training run per cell.

  python -m experiments.ablate --config configs/text_cls.py --sweep freezing_x_optimizers \
      --workdir runs/ablation [--seeds 3] [--config.KEY=VALUE ...] [--subprocess]
  python -m experiments.ablate --config configs/text_cls.py --workdir DIR \
      --sweep "freeze.policy=full,head_only;optimizer.name=adamw,sgd"
  python -m experiments.ablate --workdir DIR --report_only   # summary.md + PNGs from results.csv

``--sweep``: a name from ``configs/sweeps.py`` (``get_sweep(NAME)``; another file with
``--sweep path/to/file.py:NAME``), or inline ``KEY=V1,V2;KEY2=V3,V4``. See ``sft_jax.sweep``
for the order in which the config file, the sweep's base and per-value overrides, the cell's
values and ``--config.KEY=VALUE`` flags apply (flags last; they may not name a swept key).
``--seeds N`` runs every grid point with seeds ``config.seed`` .. ``config.seed + N - 1``.

Writes DIR/sweep.json, DIR/cells/<slug>/ (each a training run directory, plus result.json),
DIR/results.csv (one row per cell), DIR/summary.md, DIR/macro_f1_bars.png,
DIR/learning_curves.png and DIR/efficiency.png (``sft_jax.ablation_report``). Running the same
command again skips finished cells and resumes a half-finished one from its checkpoint; a failed
cell is recorded and skipped (``--retry_failed`` runs it again). Ctrl-C stops the current cell
with a checkpoint and ends the sweep.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep name, FILE.py:NAME, or KEY=V1,V2;KEY2=...")
_SWEEPS_FILE = flags.DEFINE_string("sweeps_file", "configs/sweeps.py", "File of named sweeps.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (created; reused to resume).")
_SEEDS = flags.DEFINE_integer(
    "seeds", 3, "Seeds per grid point (config.seed, +1, ...).", lower_bound=1
)
_SUBPROCESS = flags.DEFINE_bool(
    "subprocess", False, "Train each cell in its own `python -m experiments.train` process."
)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rewrite summary.md and PNGs; no training.")
_RETRY = flags.DEFINE_bool("retry_failed", False, "Run cells recorded as failed again.")
_KEEP = flags.DEFINE_bool("keep_checkpoints", False, "Keep finished cells' checkpoints.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every cell's overrides and exit.")
flags.mark_flags_as_required(["workdir"])

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_sweep():
    """``--sweep``; a relative ``--sweeps_file`` missing here is looked up in the repository."""
    from sft_jax.sweep import load_sweep

    path = _SWEEPS_FILE.value
    if not os.path.exists(path) and not os.path.isabs(path):
        path = os.path.join(_ROOT, path)
    return load_sweep(_SWEEP.value, path)


def _report_keys(workdir: str) -> tuple[list[str], str]:
    if _SWEEP.value:
        sweep = _load_sweep()
        return list(sweep.axes), sweep.name
    path = os.path.join(workdir, "sweep.json")
    if not os.path.exists(path):
        raise app.UsageError(f"--report_only needs --sweep or {path}")
    with open(path) as f:
        saved = json.load(f)
    return list(saved["axes"]), saved.get("name", "")


def _config_spec() -> str:
    """``--config`` with its file made absolute (for the per-cell subprocesses)."""
    path, colon, arg = flags.FLAGS["config"].config_filename.partition(":")
    return os.path.abspath(path) + colon + arg


def _print_plan(sweep, seeds: list[int], cfg, cli: dict) -> None:
    """``--dry_run``: the base (with the flags) once, then per cell every value it runs with
    that differs from that line, including overrides that replace a base value."""
    from sft_jax.sweep import apply_overrides, expand, final_overrides

    base = {**sweep.base, **cli}
    print("base", json.dumps(base, default=repr))
    for cell in expand(sweep, seeds):
        overrides = final_overrides(cell, cli)
        apply_overrides(cfg, overrides)  # validates
        own = {k: v for k, v in overrides.items() if k not in base or base[k] != v}
        print(cell.slug, json.dumps(own, default=repr))


def main(argv):
    del argv
    from sft_jax import ablation, ablation_report
    from sft_jax.logging import setup_cli_logging

    setup_cli_logging()
    workdir = _WORKDIR.value
    if _REPORT_ONLY.value:
        keys, title = _report_keys(workdir)
        for path in ablation_report.write_report(workdir, keys, title).values():
            print(path)
        return
    if _CONFIG.value is None or _SWEEP.value is None:
        raise app.UsageError("--config and --sweep are required (except with --report_only)")
    cfg = _CONFIG.value
    cli = dict(config_flags.get_override_values(flags.FLAGS["config"]))
    cli.pop("seed", None)  # the first seed; the cells set their own
    sweep = _load_sweep()
    seeds = [cfg.seed + i for i in range(_SEEDS.value)]
    if _DRY_RUN.value:
        _print_plan(sweep, seeds, cfg, cli)
        return
    from sft_jax.ablation_cells import SweepInterrupted, subprocess_runner
    from sft_jax.runtime import setup_runtime

    setup_runtime(cfg.get("runtime"))
    runner = subprocess_runner(_config_spec(), cwd=_ROOT) if _SUBPROCESS.value else None
    try:
        result = ablation.run_sweep(
            cfg, sweep, seeds, workdir, runner=runner, cli_overrides=cli,
            retry_failed=_RETRY.value, keep_checkpoints=_KEEP.value,
        )  # fmt: skip
    except SweepInterrupted as e:  # SIGINT / SIGTERM: the cell saved a checkpoint
        print(json.dumps({"preempted": True, "message": str(e)}))
        return
    failed = [r["slug"] for r in result.rows if r.get("status") != "ok"]
    paths = ablation_report.write_report(workdir, list(sweep.axes), sweep.name)
    print(json.dumps({"ran": len(result.ran), "skipped": len(result.skipped),
                      "failed": failed, "outputs": paths}))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
