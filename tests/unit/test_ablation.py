"""Ablation sweeps (sft_jax.sweep, sft_jax.ablation*, experiments.ablate, configs/sweeps.py):
grid, overrides, resume, failures, aggregation and report with a fake cell runner; one real
2-cell sweep."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from configs import sweeps, text_cls
from sft_jax import ablation, ablation_cells, ablation_report
from sft_jax import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = {"axes": {"freeze.policy": ["full", "lora:8"], "optimizer.name": ["adamw", "sgd"]}}


def _sweep(**spec) -> sweep_lib.Sweep:
    return sweep_lib.Sweep.from_dict({**GRID, **spec}, name="test")


# ---------------------------------------------------------------------------------------------
# Grid, slugs, overrides


def test_grid_order_and_slugs():
    cells = sweep_lib.expand(_sweep(), seeds=[0, 1])
    assert [c.slug for c in cells] == [
        "policy-full__name-adamw__seed-0", "policy-full__name-adamw__seed-1",
        "policy-full__name-sgd__seed-0", "policy-full__name-sgd__seed-1",
        "policy-lora-8__name-adamw__seed-0", "policy-lora-8__name-adamw__seed-1",
        "policy-lora-8__name-sgd__seed-0", "policy-lora-8__name-sgd__seed-1",
    ]  # fmt: skip
    assert cells[-1].values == {"freeze.policy": "lora:8", "optimizer.name": "sgd"}
    assert cells[-1].overrides == {**cells[-1].values, "seed": 1}
    same = {"axes": {"a.x": ["p:q", "p_q", "p;q"]}}
    with pytest.raises(ValueError, match="same directory name"):
        sweep_lib.expand(sweep_lib.Sweep.from_dict(same), [0])


def test_inline_sweep_values_are_literals_or_strings():
    s = sweep_lib.load_sweep(
        "freeze.policy=full, lora:8 ;optimizer.learning_rate=1e-3,3e-4;x.y=True"
    )
    assert s.axes == {
        "freeze.policy": ["full", "lora:8"],
        "optimizer.learning_rate": [1e-3, 3e-4],
        "x.y": [True],
    }
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        sweep_lib.parse_inline("freeze.policy")


def test_overrides_apply_by_specificity():
    sweep = _sweep(
        base={"optimizer.learning_rate": 1.0, "train.num_steps": 7},
        overrides={
            ("optimizer.name", "sgd"): {"optimizer.learning_rate": 2.0, "optimizer.momentum": 0.5},
            (("freeze.policy", "lora:8"), ("optimizer.name", "sgd")): {
                "optimizer.learning_rate": 3.0
            },
            ("freeze.policy", "lora:8"): {"optimizer.learning_rate": 4.0},
        },
    )
    lr = {c.slug: c.overrides["optimizer.learning_rate"] for c in sweep_lib.expand(sweep, [0])}
    assert lr == {
        "policy-full__name-adamw__seed-0": 1.0,  # base
        "policy-full__name-sgd__seed-0": 2.0,  # one condition
        "policy-lora-8__name-adamw__seed-0": 4.0,  # one condition
        "policy-lora-8__name-sgd__seed-0": 3.0,  # two conditions beat one
    }
    sgd = sweep_lib.expand(sweep, [5])[1]
    assert sgd.overrides["optimizer.momentum"] == 0.5 and sgd.overrides["train.num_steps"] == 7
    assert sgd.overrides["seed"] == 5


def test_bad_overrides_are_errors():
    lr = "optimizer.learning_rate"
    clash = _sweep(
        overrides={("optimizer.name", "sgd"): {lr: 2.0}, ("freeze.policy", "full"): {lr: 3.0}}
    )
    with pytest.raises(ValueError, match="add an override with both conditions"):
        sweep_lib.expand(clash, [0])
    with pytest.raises(ValueError, match="sets a swept key"):
        _sweep(overrides={("optimizer.name", "sgd"): {"freeze.policy": "full"}})
    with pytest.raises(ValueError, match="unswept key"):
        _sweep(overrides={("data.max_length", 64): {"optimizer.learning_rate": 1.0}})
    with pytest.raises(ValueError, match="--seeds"):
        sweep_lib.Sweep.from_dict({"axes": {"seed": [0, 1]}})


def test_overrides_of_one_layer_must_all_agree_whatever_their_order():
    """A third same-size override agreeing with the second must not hide the first's clash."""
    lr = "optimizer.learning_rate"
    axes = {"freeze.policy": ["full"], "optimizer.name": ["adamw"], "model.dtype": ["float32"]}
    overrides = {
        ("freeze.policy", "full"): {lr: 1.0},
        ("optimizer.name", "adamw"): {lr: 2.0},
        ("model.dtype", "float32"): {lr: 2.0},
    }
    sweep = sweep_lib.Sweep.from_dict({"axes": axes, "overrides": overrides})
    with pytest.raises(ValueError, match=r"set optimizer.learning_rate to 1.0 and 2.0"):
        sweep_lib.expand(sweep, [0])
    settled = {**overrides, (("freeze.policy", "full"), ("optimizer.name", "adamw")): {lr: 5.0}}
    cell = sweep_lib.expand(sweep_lib.Sweep.from_dict({"axes": axes, "overrides": settled}), [0])
    assert cell[0].overrides[lr] == 5.0
    agree = {k: {lr: 2.0} for k in overrides}
    cell = sweep_lib.expand(sweep_lib.Sweep.from_dict({"axes": axes, "overrides": agree}), [0])
    assert cell[0].overrides[lr] == 2.0


def test_no_seeds_is_an_error():
    with pytest.raises(ValueError, match="no seeds"):
        sweep_lib.expand(_sweep(), [])


def test_apply_overrides_checks_keys_and_types_and_cli_comes_last():
    cfg = text_cls.get_config()
    out = sweep_lib.apply_overrides(cfg, {"data.buckets": [32, 64], "optimizer.learning_rate": 1})
    assert out.data.buckets == (32, 64) and out.optimizer.learning_rate == 1.0
    assert cfg.data.buckets == (32, 64, 128)  # the original is untouched
    with pytest.raises(ValueError, match="no key 'optimizer.lr'"):
        sweep_lib.apply_overrides(cfg, {"optimizer.lr": 1e-3})
    with pytest.raises(ValueError, match="train.num_steps"):
        sweep_lib.apply_overrides(cfg, {"train.num_steps": "many"})
    cell = sweep_lib.expand(_sweep(base={"train.num_steps": 60}), [0])[0]
    assert sweep_lib.final_overrides(cell, {"train.num_steps": 5})["train.num_steps"] == 5
    with pytest.raises(ValueError, match="swept key"):
        sweep_lib.final_overrides(cell, {"optimizer.name": "lion"})


def test_named_sweep_freezing_x_optimizers():
    sweep = sweep_lib.load_sweep("freezing_x_optimizers", os.path.join(ROOT, "configs/sweeps.py"))
    cells = sweep_lib.expand(sweep, [0, 1, 2])
    assert len(cells) == 48 and len({c.slug for c in cells}) == 48
    cfg = text_cls.get_config()
    by = {}
    for c in cells:  # every cell's config is valid for the tweet task
        run = sweep_lib.apply_overrides(cfg, c.overrides)
        by[(run.freeze.policy, run.optimizer.name)] = run
        assert run.train.num_steps == 50 and run.data.buckets == (32, 64)
        assert run.train.max_eval_batches * run.data.eval_batch_size == 512
    lr = {k: r.optimizer.learning_rate for k, r in by.items()}
    for preset in sweeps.PRESETS:
        assert lr[(preset, "sgd")] == pytest.approx(30 * lr[(preset, "adamw")])
        assert lr[(preset, "lion")] == pytest.approx(lr[(preset, "adamw")] / 5)
    assert lr[("full", "adamw")] == 1e-4 and lr[("lora:8", "adamw")] == 2e-3
    assert by[("full", "sgd")].optimizer.momentum == 0.9
    assert by[("bitfit", "lion")].optimizer.b2 == 0.99
    with pytest.raises(ValueError, match="unknown sweep"):
        sweeps.get_sweep("nope")


# ---------------------------------------------------------------------------------------------
# The sweep with a fake cell runner


F1 = {
    ("full", "adamw"): 0.8,
    ("full", "sgd"): 0.6,
    ("lora:8", "adamw"): 0.7,
    ("lora:8", "sgd"): 0.5,
}


def fake_runner(calls, fail=()):
    """Writes a deterministic run: val macro-F1 = F1[cell] + 0.1 * (seed - 1); train loss
    1 / step; steps/s 2, 4, 3 (median 3); raises for the cells in ``fail``."""

    def run(cfg, overrides, cell_dir):
        key = (cfg.freeze.policy, cfg.optimizer.name)
        calls.append((key, cfg.seed))
        os.makedirs(os.path.join(cell_dir, "checkpoints", "3"), exist_ok=True)
        if (key, cfg.seed) in fail:
            raise FloatingPointError("6 non-finite updates in a row")
        rows = [
            {
                "step": s,
                "split": "train",
                "loss": 1.0 / s,
                "steps_per_sec": sps,
                "tokens_per_sec": 100 * sps,
            }
            for s, sps in ((1, 2.0), (2, 4.0), (3, 3.0))
        ]
        f1 = F1[key] + 0.1 * (cfg.seed - 1)
        rows += [{"step": 3, "split": "validation", "loss": 0.5, "accuracy": f1 + 0.05,
                  "macro_f1": f1}]  # fmt: skip
        with open(os.path.join(cell_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        trainable = 10 if cfg.freeze.policy == "lora:8" else 1000
        with open(os.path.join(cell_dir, "run.json"), "w") as f:
            json.dump({"num_params": 1000, "num_trainable_params": trainable,
                       "optimizer_state_bytes": 8 * trainable}, f)  # fmt: skip
        return {"peak_rss_bytes": 2_000_000, "rss_start_bytes": 1_000_000,
                "peak_rss_scope": "cell", "compiled_step_bytes": 3_000_000}  # fmt: skip

    return run


def test_sweep_records_failures_resumes_and_reports(tmp_path):
    cfg, calls, workdir = text_cls.get_config(), [], str(tmp_path)
    fail = {(("lora:8", "sgd"), 1)}
    out = ablation.run_sweep(cfg, _sweep(), [0, 1, 2], workdir, runner=fake_runner(calls, fail))
    assert len(out.ran) == 12 and out.skipped == [] and len(calls) == 12
    rows = ablation.read_results(workdir)
    assert [r["slug"] for r in rows] == [c.slug for c in sweep_lib.expand(_sweep(), [0, 1, 2])]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["slug"] for r in failed] == ["policy-lora-8__name-sgd__seed-1"]
    assert failed[0]["error"] == "FloatingPointError: 6 non-finite updates in a row"
    first = rows[0]
    assert first["freeze.policy"] == "full" and first["seed"] == "0"
    assert float(first["val_macro_f1"]) == pytest.approx(0.7)
    assert float(first["step_time_s"]) == pytest.approx(1 / 3)  # 1 / median steps/s
    assert first["optimizer_state_bytes"] == "8000" and first["workdir"] == os.path.join(
        "cells", first["slug"]
    )
    # Finished cells lose their checkpoints; the failed one keeps what it had.
    assert not os.path.exists(os.path.join(workdir, "cells", first["slug"], "checkpoints"))
    assert os.path.exists(os.path.join(workdir, "cells", failed[0]["slug"], "checkpoints"))

    # Again: nothing runs (failed cells included); --retry_failed reruns only the failed one.
    again = ablation.run_sweep(cfg, _sweep(), [0, 1, 2], workdir, runner=fake_runner(calls))
    assert again.ran == [] and len(again.skipped) == 12 and len(calls) == 12
    os.remove(os.path.join(workdir, "cells", first["slug"], "result.json"))  # the csv row counts
    retry = ablation.run_sweep(
        cfg, _sweep(), [0, 1, 2], workdir, runner=fake_runner(calls), retry_failed=True
    )
    assert retry.ran == ["policy-lora-8__name-sgd__seed-1"]
    assert all(r["status"] == "ok" for r in ablation.read_results(workdir))

    paths = ablation_report.write_report(workdir, list(_sweep().axes), "test")
    assert set(paths) == {"summary", "bars", "efficiency", "curves"}
    for key in ("bars", "efficiency", "curves"):
        with Image.open(paths[key]) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 300
    summary = open(paths["summary"]).read()
    # full/adamw: seeds give 0.7, 0.8, 0.9 -> mean 0.8, sample std 0.1; the best row first.
    assert "| `full` | `adamw` | 3/3 | 0.850 ± 0.100 | 0.800 ± 0.100 | 1,000 | 8.0 kB |" in summary
    table = [line for line in summary.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1:3] for line in table[:4]] == [
        [" `full` ", " `adamw` "], [" `lora:8` ", " `adamw` "],
        [" `full` ", " `sgd` "], [" `lora:8` ", " `sgd` "],
    ]  # fmt: skip
    assert "| `full` | **0.800 ± 0.100** | 0.600 ± 0.100 |" in summary  # pivot, best in bold


def test_interrupted_cell_stops_the_sweep_and_resumes(tmp_path):
    cfg, calls, workdir = text_cls.get_config(), [], str(tmp_path)
    inner = fake_runner(calls)

    def interrupted(cfg_, overrides, cell_dir):
        if cfg_.optimizer.name == "sgd":
            raise ablation_cells.SweepInterrupted("stopped")
        return inner(cfg_, overrides, cell_dir)

    with pytest.raises(ablation_cells.SweepInterrupted):
        ablation.run_sweep(cfg, _sweep(), [0], workdir, runner=interrupted)
    done = [r["slug"] for r in ablation.read_results(workdir)]
    assert done == ["policy-full__name-adamw__seed-0"]
    out = ablation.run_sweep(cfg, _sweep(), [0], workdir, runner=fake_runner(calls))
    assert out.skipped == ["policy-full__name-adamw__seed-0"] and len(out.ran) == 3


def _lm_runner(cfg, overrides, cell_dir):
    """A causal-LM run: validation logs loss, perplexity and token accuracy, no macro-F1."""
    rows = [{"step": s, "split": "train", "loss": 2.0 / s, "steps_per_sec": 2.0} for s in (1, 2)]
    rows.append({"step": 2, "split": "validation", "loss": 1.5, "perplexity": 4.5,
                 "token_accuracy": 0.6})  # fmt: skip
    with open(os.path.join(cell_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(cell_dir, "run.json"), "w") as f:
        json.dump({"num_params": 10, "num_trainable_params": 10, "optimizer_state_bytes": 80}, f)
    return {}


def test_causal_lm_cells_without_macro_f1_finish(tmp_path):
    sweep = sweep_lib.load_sweep("optimizer.name=adamw,sgd")
    out = ablation.run_sweep(text_cls.get_config(), sweep, [0], str(tmp_path), runner=_lm_runner)
    assert [r["status"] for r in out.rows] == ["ok", "ok"], [r["error"] for r in out.rows]
    assert out.rows[0]["val_loss"] == 1.5 and out.rows[0]["best_val_macro_f1"] is None
    assert "summary" in ablation_report.write_report(str(tmp_path), list(sweep.axes))


def test_image_cells_report_images_per_second(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1.0, "steps_per_sec": 2.0, "images_per_sec": v}
            for s, v in ((1, 10.0), (2, 30.0), (3, 20.0))]  # fmt: skip
    rows.append({"step": 3, "split": "validation", "loss": 0.5, "accuracy": 0.9, "macro_f1": 0.8})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "run.json").write_text("{}")
    out = ablation.summarize_cell(str(tmp_path))
    assert out["images_per_sec"] == 20.0 and out["tokens_per_sec"] is None
    assert "images_per_sec" in ablation.result_columns(["freeze.policy"])


def test_damaged_result_json_reruns_its_cell(tmp_path):
    """A result.json cut short (a kill while it was written) is not a finished cell: the cell
    runs again instead of the sweep stopping on a JSON error."""
    calls, workdir = [], str(tmp_path)
    ablation.run_sweep(text_cls.get_config(), _sweep(), [0], workdir, runner=fake_runner(calls))
    last = sweep_lib.expand(_sweep(), [0])[-1].slug
    path = os.path.join(workdir, "cells", last, "result.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    ablation.write_results(workdir, list(_sweep().axes), ablation.read_results(workdir)[:-1])
    out = ablation.run_sweep(text_cls.get_config(), _sweep(), [0], workdir,
                             runner=fake_runner(calls))  # fmt: skip
    assert out.ran == [last] and len(out.skipped) == 3
    assert json.load(open(path))["status"] == "ok" and not os.path.exists(path + ".tmp")


def test_mean_std_and_aggregate_are_exact():
    assert ablation_report.mean_std([0.5, 0.7, 0.9]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert ablation_report.mean_std([0.4]) == (0.4, 0.0)
    assert ablation_report.mean_std([]) == (None, None)
    rows = [
        {"a": "x", "status": "ok", "val_macro_f1": "0.5", "peak_rss_bytes": "10"},
        {"a": "x", "status": "ok", "val_macro_f1": "0.9", "peak_rss_bytes": "30"},
        {"a": "x", "status": "failed", "val_macro_f1": "", "peak_rss_bytes": ""},
        {"a": "y", "status": "failed", "error": "boom"},
    ]
    x, y = ablation_report.aggregate(rows, ["a"])
    assert (x["n"], x["n_total"], x["peak_rss_bytes"]) == (2, 3, 30)
    assert x["val_macro_f1"] == (pytest.approx(0.7), pytest.approx(0.4 / 2**0.5))
    assert y["n"] == 0 and y["val_macro_f1"] == (None, None)
    text = ablation_report.summary_markdown(rows, ["a"])
    assert "| `x` | 2/3 | - | 0.700 ± 0.283 |" in text and ": boom" in text


def test_peak_rss_covers_an_allocation_in_the_block():
    # In a fresh process: a long-lived one (the test session) may serve the allocation from
    # pages it already holds, so its RSS high-water mark would not move.
    code = (
        "import json, numpy as np\n"
        "from sft_jax import ablation_cells\n"
        "with ablation_cells.PeakRSS() as peak:\n"
        "    block = np.ones(64 * 2**20 // 8)\n"
        "    del block\n"
        "print(json.dumps(peak.fields()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    f = json.loads(out.stdout.strip().splitlines()[-1])
    assert f["peak_rss_scope"] in ("cell", "process")
    assert f["peak_rss_bytes"] >= 60 * 2**20
    if f["peak_rss_scope"] == "cell":
        assert f["peak_rss_bytes"] - f["rss_start_bytes"] >= 60 * 2**20


def test_peak_rss_is_never_below_the_rss_at_the_start(monkeypatch):
    # The kernel's per-thread RSS counters lag: the reset high-water mark can read a page below
    # the RSS read after the reset (seen in CI: 6,817,677,312 < 6,817,681,408 bytes).
    reads = {"VmRSS": iter([1_000_004, 1_000_001]), "VmHWM": iter([1_000_000, 1_000_000])}
    monkeypatch.setattr(ablation_cells, "_proc_status_kb", lambda field: next(reads[field]))
    with ablation_cells.PeakRSS() as peak:
        pass
    if peak.scope == "cell":  # /proc/self/clear_refs was writable
        assert (
            peak.fields()["peak_rss_bytes"] == peak.fields()["rss_start_bytes"] == 1_000_004 * 1024
        )


# ---------------------------------------------------------------------------------------------
# The subprocess runner and the command line, with a fake `experiments.train`

FAKE_TRAIN = """
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
workdir = sys.argv[sys.argv.index("--workdir") + 1]
json.dump(sys.argv[1:], open(os.path.join(workdir, "argv.json"), "w"))
if args.get("--config.optimizer.name") == "sgd":
    print("diverged", file=sys.stderr); sys.exit(3)
rows = [{"step": 1, "split": "train", "loss": 1.0, "steps_per_sec": 2.0},
        {"step": 1, "split": "validation", "loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4}]
open(os.path.join(workdir, "metrics.jsonl"), "w").writelines(json.dumps(r) + "\\n" for r in rows)
json.dump({"num_trainable_params": 1, "optimizer_state_bytes": 8},
          open(os.path.join(workdir, "run.json"), "w"))
print(json.dumps({"preempted": args.get("--config.seed") == "7"}))
"""


def test_subprocess_runner_passes_flags_and_records_failures(tmp_path):
    fake = tmp_path / "repo" / "experiments"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "train.py").write_text(textwrap.dedent(FAKE_TRAIN))
    runner = ablation_cells.subprocess_runner("/abs/configs/text_cls.py:debug", str(fake.parent))
    sweep = sweep_lib.Sweep.from_dict(
        {"axes": {"optimizer.name": ["adamw", "sgd"]}, "base": {"data.buckets": (32, 64)}}
    )
    workdir = str(tmp_path / "sweep")
    out = ablation.run_sweep(text_cls.get_config(), sweep, [0], workdir, runner=runner,
                             cli_overrides={"train.num_steps": 3})  # fmt: skip
    ok, failed = out.rows
    assert ok["status"] == "ok" and ok["peak_rss_scope"] == "subprocess"
    assert ok["peak_rss_bytes"] > 1e6 and ok["compiled_step_bytes"] is None
    argv = json.load(open(os.path.join(workdir, "cells", ok["slug"], "argv.json")))
    assert argv[:4] == ["--config", "/abs/configs/text_cls.py:debug", "--workdir",
                        os.path.abspath(os.path.join(workdir, "cells", ok["slug"]))]  # fmt: skip
    assert argv[4:] == ["--config.data.buckets=(32, 64)", "--config.optimizer.name=adamw",
                        "--config.seed=0", "--config.train.num_steps=3"]  # fmt: skip
    assert failed["status"] == "failed" and "status 3" in failed["error"]
    assert "diverged" in failed["error"]
    with pytest.raises(ablation_cells.SweepInterrupted):  # the child reports preempted: true
        ablation.run_sweep(text_cls.get_config(), sweep, [7], workdir, runner=runner)


def _ablate(*args, cwd=ROOT):
    cmd = [sys.executable, "-m", "experiments.ablate", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_command_line_dry_run_and_report_only(tmp_path):
    out = _ablate("--config", "configs/text_cls.py", "--sweep", "freezing_x_optimizers",
                  "--workdir", str(tmp_path), "--dry_run", "--seeds", "2",
                  "--config.train.num_steps=30")  # fmt: skip
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 32 and json.loads(lines[0][5:])["train.num_steps"] == 30
    assert lines[-1].startswith("policy-lora-8__name-adafactor__seed-1 ")
    assert json.loads(lines[-1].split(" ", 1)[1])["optimizer.learning_rate"] == 0.04
    # --report_only: keys from DIR/sweep.json, outputs from results.csv alone.
    ablation.run_sweep(text_cls.get_config(), _sweep(), [0, 1], str(tmp_path),
                       runner=fake_runner([]))  # fmt: skip
    printed = _ablate("--workdir", str(tmp_path), "--report_only").split()
    assert str(tmp_path / "summary.md") in printed and (tmp_path / "efficiency.png").exists()


SWEEP_WITH_BASE = """
def get_sweep(name):
    return {
        "axes": {"optimizer.name": ["adamw", "sgd"]},
        "base": {"optimizer.learning_rate": 1e-4, "train.num_steps": 50},
        "overrides": {("optimizer.name", "sgd"): {"optimizer.learning_rate": 3e-3}},
    }
"""


def test_command_line_dry_run_shows_overrides_of_base_values_and_checks_seeds(tmp_path):
    (tmp_path / "sweeps.py").write_text(SWEEP_WITH_BASE)
    out = _ablate("--config", "configs/text_cls.py", "--sweep", f"{tmp_path}/sweeps.py:x",
                  "--workdir", str(tmp_path), "--dry_run", "--seeds", "1")  # fmt: skip
    base, adamw, sgd = (json.loads(line.split(" ", 1)[1]) for line in out.strip().splitlines())
    assert base == {"optimizer.learning_rate": 1e-4, "train.num_steps": 50}
    assert adamw == {"optimizer.name": "adamw", "seed": 0}
    assert sgd == {"optimizer.learning_rate": 3e-3, "optimizer.name": "sgd", "seed": 0}
    with pytest.raises(subprocess.CalledProcessError) as e:
        _ablate("--config", "configs/text_cls.py", "--sweep", "optimizer.name=adamw",
                "--workdir", str(tmp_path / "none"), "--seeds", "0")  # fmt: skip
    assert "--seeds" in e.value.stderr and not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------
# One real sweep


@pytest.mark.slow
def test_real_two_cell_sweep_on_tiny_bert(tmp_path):
    from tests.tiny_text import make_config, make_tiny_setup

    cfg = make_config(*make_tiny_setup(tmp_path), num_steps=2, eval_every_steps=2)
    sweep = sweep_lib.load_sweep("freeze.policy=full,head_only")
    workdir = str(tmp_path / "sweep")
    out = ablation.run_sweep(cfg, sweep, [0], workdir)
    full, head = out.rows
    assert full["status"] == "ok" and head["status"] == "ok", (full["error"], head["error"])
    assert head["num_trainable_params"] == 32 * 3 + 3  # the classifier of the 32-wide BERT
    assert full["num_trainable_params"] > 100 * head["num_trainable_params"]
    assert head["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    for r in (full, head):
        assert 0.0 <= r["val_macro_f1"] <= 1.0 and r["step_time_s"] > 0
        assert r["compiled_step_bytes"] > 0 and r["peak_rss_bytes"] >= r["rss_start_bytes"] > 0
        assert not os.path.exists(os.path.join(workdir, r["workdir"], "checkpoints"))
    assert ablation.run_sweep(cfg, sweep, [0], workdir).ran == []
    paths = ablation_report.write_report(workdir, ["freeze.policy"])
    for key in ("bars", "efficiency", "curves"):
        with Image.open(paths[key]) as im:
            im.load()


def test_sweep_file_without_get_sweep_is_named(tmp_path):
    path = tmp_path / "sweeps.py"
    path.write_text("SWEEPS = {}\n")
    with pytest.raises(AttributeError, match=rf"sweep file {path} defines no get_sweep"):
        sweep_lib.load_sweep(f"{path}:lr")


# The parent announces "waiting" from inside os.wait4, i.e. once wait_forwarding_sigterm has
# installed its handler: a SIGTERM sent before that would (correctly) kill the parent.
_PARENT = """
import os, subprocess, sys
from sft_jax.ablation_cells import wait_forwarding_sigterm
child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
real_wait4 = os.wait4
def announcing_wait4(pid, options):
    print("waiting", pid, flush=True)
    return real_wait4(pid, options)
os.wait4 = announcing_wait4
code, _ = wait_forwarding_sigterm(child)
print("child exited", code, flush=True)
"""
_CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))  # as the trainer: stop cleanly\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_sigterm_to_the_sweep_reaches_the_cell_being_trained():
    """Only the sweep process is terminated (a scheduler's preemption): the training child gets
    the SIGTERM too and stops, instead of training on orphaned."""
    parent = subprocess.Popen(
        [sys.executable, "-c", f"CHILD = {_CHILD!r}\n{_PARENT}"],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )  # fmt: skip
    words = parent.stdout.readline().split()
    assert words[0] == "waiting", words
    child_pid = int(words[1])
    try:
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=60)
        assert parent.returncode == 0 and out.strip() == "child exited 7"
    finally:
        try:
            os.kill(child_pid, signal.SIGKILL)  # only if it outlived the test (the bug)
        except ProcessLookupError:
            pass
