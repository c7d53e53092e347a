"""Learning curves: series extraction from metrics rows, PNGs of one run and of several."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sft_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _synthetic_rows(num_steps: int = 60, eval_every: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, num_steps + 1):
        loss = 2.0 * math.exp(-step / 20) + 0.2 * rng.random()
        rows.append(
            {
                "step": step,
                "split": "train",
                "loss": loss,
                "accuracy": 1 - loss / 3,
                "learning_rate": 1e-3 * (1 - step / num_steps),
            }
        )
        if step % eval_every == 0:
            rows.append({"step": step, "split": "data", "hash": "abc"})
            rows.append(
                {
                    "step": step,
                    "split": "validation",
                    "loss": loss + 0.1,
                    "accuracy": 0.9 - loss / 4,
                    "per_class_f1": [0.5, 0.6],
                }
            )
    return rows


def _workdir(tmp_path, rows, steps_per_epoch=None):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if steps_per_epoch:
        (tmp_path / "run.json").write_text(json.dumps({"steps_per_epoch": steps_per_epoch}))
    return tmp_path


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        assert im.width > 100 and im.height > 100
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something was drawn


def test_curves_exact_series_repeated_step_and_ignored_rows():
    rows = [
        {"step": 1, "split": "train", "loss": 2.0, "learning_rate": 1e-3, "note": "warmup"},
        {"step": 2, "split": "train", "loss": 1.5, "learning_rate": 1e-3},
        {"step": 2, "split": "data", "loss": 99.0, "hash": "deadbeef"},  # not a metric split
        {"step": 2, "split": "validation", "loss": 1.7, "accuracy": 0.5, "cm": [[1, 0], [0, 1]]},
        {"step": 3, "split": "train", "loss": 1.2, "learning_rate": 5e-4, "flag": True},
        # a resumed run repeats steps 2 and 3: the later rows win
        {"step": 2, "split": "train", "loss": 1.4, "learning_rate": 1e-3},
        {"step": 3, "split": "train", "loss": 1.1, "learning_rate": 5e-4},
        {"step": 4, "split": "train", "loss": float("nan"), "learning_rate": 2e-4},
        {"step": 4, "split": "validation", "loss": 1.3, "accuracy": 1},
        {"step": 4, "split": "test", "accuracy": 0.75},
        {"step": 5, "split": "benchmark", "accuracy": 0.1},
    ]
    got = plots.curves(rows)
    assert got == {
        "loss": {
            "train": ([1, 2, 3], [2.0, 1.4, 1.1]),  # NaN at step 4 left out
            "validation": ([2, 4], [1.7, 1.3]),
        },
        "learning_rate": {"train": ([1, 2, 3, 4], [1e-3, 1e-3, 5e-4, 2e-4])},
        "accuracy": {"validation": ([2, 4], [0.5, 1.0]), "test": ([4], [0.75])},
    }
    assert all(isinstance(v, float) for v in got["accuracy"]["validation"][1])
    assert list(got["loss"]) == ["train", "validation"]  # splits in a fixed order


def test_curves_later_non_numeric_value_replaces_earlier_and_order_is_by_step():
    rows = [
        {"step": 5, "split": "train", "loss": 1.0},
        {"step": 3, "split": "train", "loss": 2.0},
        {"step": 5, "split": "train", "loss": float("inf")},
    ]
    assert plots.curves(rows) == {"loss": {"train": ([3], [2.0])}}
    assert plots.curves([{"step": 1, "split": "data", "hash": "x"}]) == {}


def test_smooth_window_grows_with_points_and_keeps_ends():
    values, window = plots.smooth([1.0, 2.0, 3.0])
    assert window == 1 and values.tolist() == [1.0, 2.0, 3.0]
    values, window = plots.smooth(list(range(40)))
    assert window == 5
    assert values[0] == pytest.approx(1.0)  # mean of 0, 1, 2 (window shrinks at the edge)
    assert values[20] == pytest.approx(20.0)
    assert plots.smooth(np.zeros(100_000))[1] == 101


def test_plot_curves_from_workdir_writes_png(tmp_path):
    wd = tmp_path / "run_a"
    wd.mkdir()
    _workdir(wd, _synthetic_rows(), steps_per_epoch=20)
    out = plots.plot_curves(str(wd), str(tmp_path / "figs" / "curves.png"))
    assert out == str(tmp_path / "figs" / "curves.png")
    _assert_png(out)
    with Image.open(out) as im:  # two panels (loss, accuracy) side by side
        assert im.width > im.height


def test_plot_curves_from_rows_skips_missing_metrics(tmp_path):
    out = plots.plot_curves(
        _synthetic_rows(), tmp_path / "c.png", metrics=("accuracy", "macro_f1"), title="rows"
    )
    _assert_png(out)


def test_plot_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_curves(str(tmp_path), str(tmp_path / "c.png"))
    _workdir(tmp_path, _synthetic_rows())
    with pytest.raises(ValueError, match=r"logged metrics: \['accuracy', 'learning_rate', 'loss'"):
        plots.plot_curves(str(tmp_path), str(tmp_path / "c.png"), metrics=("bleu",))
    assert not (tmp_path / "c.png").exists()


def test_plot_comparison(tmp_path):
    runs = {"probe": _synthetic_rows(seed=1), "full": _synthetic_rows(seed=2)}
    out = plots.plot_comparison(runs, tmp_path / "cmp.png", metric="accuracy")
    _assert_png(out)
    _assert_png(plots.plot_comparison(runs, tmp_path / "train.png", metric="loss", split="train"))
    with pytest.raises(ValueError, match="no run logged 'bleu' on split 'validation'"):
        plots.plot_comparison(runs, tmp_path / "x.png", metric="bleu")


def _plot_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.plot", *args], capture_output=True, text=True
    )


def test_cli_one_and_several_workdirs(tmp_path):
    a, b = tmp_path / "probe", tmp_path / "full"
    for i, wd in enumerate((a, b)):
        wd.mkdir()
        _workdir(wd, _synthetic_rows(seed=i), steps_per_epoch=30)
    out = _plot_cli(f"--workdir={a}")
    assert out.returncode == 0, out.stderr
    assert f"wrote {a / 'curves.png'}" in out.stdout
    _assert_png(a / "curves.png")

    out = _plot_cli(
        f"--workdir={a}", f"--workdir={b}", "--metrics=loss,accuracy", f"--out={tmp_path}/cmp.png"
    )
    assert out.returncode == 0, out.stderr
    for metric in ("loss", "accuracy"):
        assert f"wrote {tmp_path}/cmp_{metric}.png" in out.stdout
        _assert_png(tmp_path / f"cmp_{metric}.png")

    out = _plot_cli(f"--workdir={a}", f"--workdir={b}")
    assert out.returncode != 0 and "need --out" in out.stderr
