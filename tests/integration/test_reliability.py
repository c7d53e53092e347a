"""Reliability of training runs on a tiny random BERT: preemption (SIGTERM) and hard kills
resume to the uninterrupted run, damaged checkpoints fall back, interrupted saves never count,
NaN updates are skipped or stop the run with a checkpoint, same seed = same metrics."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from sft_jax import logging as log_lib
from sft_jax.restore import restore_run
from sft_jax.tasks import batch_units
from sft_jax.trainer import NonFiniteError, Trainer
from tests.tiny_text import as_flags, config_overrides, make_config, make_tiny_setup

TIMING = ("tokens_per_sec", "steps_per_sec")


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("reliability"))


def rows(workdir):
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log_lib.read_metrics(workdir)]


def params_of(workdir, which="latest"):
    model = restore_run(workdir, which).model
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


def norm(leaves):
    return np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in leaves))


def assert_same_run(a, b):
    assert rows(a) == rows(b)
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(setup_dirs, tmp_path_factory):
    """An uninterrupted run with a checkpoint every 2 steps (12 steps, evals at 6 and 12)."""
    workdir = str(tmp_path_factory.mktemp("ref") / "run")
    cfg = make_config(*setup_dirs, **_SETTINGS)
    Trainer(cfg, workdir).run()
    return workdir


_SETTINGS = {
    "num_steps": 12,
    "eval_every_steps": 6,
    "checkpoint.every_steps": 2,
    "checkpoint.keep_latest": 3,
}


def start_training(setup_dirs, workdir, **extra):
    overrides = config_overrides(*setup_dirs, **{**_SETTINGS, **extra})
    cmd = [sys.executable, "-m", "experiments.train", "--config", "configs/text_cls.py:debug",
           "--workdir", workdir, *as_flags(overrides)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step, proc, timeout=300):
    """Waits until metrics.jsonl has a train row at ``step`` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        done = [r["step"] for r in log_lib.read_metrics(workdir) if r["split"] == "train"]
        if done and max(done) >= step:
            return max(done)
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {workdir}")


@pytest.mark.slow
def test_sigterm_saves_and_resume_equals_uninterrupted(setup_dirs, reference, tmp_path):
    workdir = str(tmp_path / "run")
    # Checkpoints only at evaluations: what SIGTERM saves is all that is kept before step 6.
    proc = start_training(setup_dirs, workdir, **{"checkpoint.every_steps": 0})
    wait_for_step(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] is True
    saved = restore_run(workdir, "latest").step
    assert 3 <= saved < 12
    assert "SIGTERM received" in err

    Trainer(make_config(*setup_dirs, **_SETTINGS), workdir).run()
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(setup_dirs, reference, tmp_path):
    workdir = str(tmp_path / "run")
    proc = start_training(setup_dirs, workdir, **{"checkpoint.async_save": True})
    wait_for_step(workdir, 3 + int(np.random.default_rng().integers(0, 5)), proc)
    proc.kill()  # SIGKILL: no handler runs, a save may be half written
    proc.communicate(timeout=60)
    Trainer(make_config(*setup_dirs, **_SETTINGS), workdir).run()
    assert_same_run(workdir, reference)
    data = [r for r in log_lib.read_metrics(workdir) if r["split"] == "data"]
    assert [r["epoch"] for r in data] == sorted({r["epoch"] for r in data})  # logged once each


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(setup_dirs, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    ckpts = workdir / "checkpoints"
    # Damage the newest checkpoint (12): every array and manifest file truncated.
    for root, _, files in os.walk(ckpts / "12" / "params"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    Trainer(make_config(*setup_dirs, **_SETTINGS), str(workdir)).run()
    assert any(p.name.startswith("12.corrupt-") for p in ckpts.iterdir())  # kept, moved aside
    assert_same_run(str(workdir), reference)


@pytest.mark.slow
def test_interrupted_save_is_never_latest(setup_dirs, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    ckpts = workdir / "checkpoints"
    # What an interrupted save leaves behind: Orbax's temporary directory, never renamed.
    shutil.copytree(ckpts / "12", ckpts / "14.orbax-checkpoint-tmp-1700000000")
    run = restore_run(str(workdir), "latest")
    assert run.step == 12


@pytest.mark.slow
def test_best_checkpoint_survives_restarts(setup_dirs, reference, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = make_config(*setup_dirs, **_SETTINGS)
    Trainer(cfg, workdir).run(stop_after_step=7)
    Trainer(cfg, workdir).run()
    assert restore_run(workdir, "best").step == restore_run(reference, "best").step


class PoisonedTrainer(Trainer):
    """Makes the loss of the given steps NaN (a NaN example weight), nothing else."""

    poisoned: tuple[int, ...] = ()

    def _batch(self, step):
        batch = dict(super()._batch(step))
        if step in self.poisoned:
            batch["example_mask"] = batch["example_mask"].copy()
            batch["example_mask"][0] = np.nan
        return batch


@pytest.mark.slow
def test_nan_update_is_skipped(setup_dirs, tmp_path):
    cfg = make_config(*setup_dirs, num_steps=4, eval_every_steps=4)
    clean, poisoned = str(tmp_path / "clean"), str(tmp_path / "poisoned")
    Trainer(cfg, clean).run()
    trainer = PoisonedTrainer(cfg, poisoned)
    trainer.poisoned = (3,)  # the 4th update
    trainer.run()
    train = [r for r in log_lib.read_metrics(poisoned) if r["split"] == "train"]
    assert [r["nonfinite"] for r in train] == [0.0, 0.0, 0.0, 1.0]
    # Skipping the last update leaves the parameters of step 3 of the clean run.
    clean_train = [r for r in log_lib.read_metrics(clean) if r["split"] == "train"]
    assert norm(params_of(poisoned)) == pytest.approx(clean_train[2]["param_norm"], rel=1e-5)
    assert norm(params_of(clean)) == pytest.approx(clean_train[3]["param_norm"], rel=1e-5)
    assert np.isfinite([r["loss"] for r in log_lib.read_metrics(poisoned)
                        if r["split"] == "validation"]).all()  # fmt: skip


@pytest.mark.slow
def test_too_many_nan_updates_stop_with_a_checkpoint(setup_dirs, tmp_path):
    cfg = make_config(*setup_dirs, num_steps=8, eval_every_steps=8, max_skipped_steps=1)
    workdir = str(tmp_path / "run")
    trainer = PoisonedTrainer(cfg, workdir)
    trainer.poisoned = (2, 3, 4)
    with pytest.raises(NonFiniteError, match="2 non-finite updates in a row up to step 4"):
        trainer.run()
    # The trainer reads step 4's flag once step 5 is issued (one step late); the checkpoint is
    # the state after step 5, whose update was skipped too, and the log has every step's row.
    assert restore_run(workdir, "latest").step == 5
    rows = log_lib.read_metrics(workdir)
    train = [(r["step"], r["nonfinite"]) for r in rows if r["split"] == "train"]
    assert train == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0)]
    good = [r for r in log_lib.read_metrics(workdir) if r["split"] == "train"][1]
    # The saved parameters are those after step 2, the last good update.
    assert norm(params_of(workdir)) == pytest.approx(good["param_norm"], rel=1e-5)
    # Resumed (as after lowering the learning rate), the run has the full allowance again: one
    # more non-finite update is skipped, not a reason to stop at once.
    resumed = PoisonedTrainer(cfg, workdir)
    resumed.poisoned = (5,)  # its first update
    resumed.run()
    train = [r for r in log_lib.read_metrics(workdir) if r["split"] == "train"]
    assert [(r["step"], r["nonfinite"]) for r in train[-3:]] == [(6, 1.0), (7, 0.0), (8, 0.0)]


def test_nonfinite_stop_at_an_evaluation_step_evaluates_it(setup_dirs, tmp_path):
    """The stop's checkpoint is the state after an evaluation step (here the last): it is
    evaluated and ranked before the save, as the resumed run starts after it."""
    cfg = make_config(*setup_dirs, num_steps=4, eval_every_steps=4, max_skipped_steps=1)
    workdir = str(tmp_path / "run")
    trainer = PoisonedTrainer(cfg, workdir)
    trainer.poisoned = (1, 2)
    with pytest.raises(NonFiniteError, match="up to step 3"):
        trainer.run()
    assert restore_run(workdir, "best").step == 4
    rows = [(r["step"], r["split"]) for r in log_lib.read_metrics(workdir)]
    assert rows == [(0, "data")] + [(s, "train") for s in (1, 2, 3, 4)] + [(4, "validation")]
    assert Trainer(cfg, workdir).run()["accuracy"] == log_lib.read_metrics(workdir)[-1]["accuracy"]


def test_unknown_best_metric_is_named_before_anything_is_written(setup_dirs, tmp_path):
    workdir = tmp_path / "run"
    cfg = make_config(*setup_dirs, num_steps=4, **{"checkpoint.best_metric": "bleu"})
    with pytest.raises(ValueError, match=r"checkpoint.best_metric='bleu' .*'accuracy'.*'f1/"):
        Trainer(cfg, str(workdir))
    assert not workdir.exists()


class _Flag:
    """A metric value that records when the host reads it."""

    def __init__(self, value, step, events):
        self.value, self.step, self.events = value, step, events

    def _read(self):
        self.events.append(("read", self.step))
        return np.asarray(self.value)

    def __float__(self):
        return float(self._read())

    def __array__(self, dtype=None, copy=None):
        return self._read()


class RecordingRunner:
    """Wraps the trainer's runner: records each step issued and each host read of its flag."""

    def __init__(self, runner, events):
        self.runner, self.events = runner, events

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, state, batch):
        state, m = self.runner(state, batch)
        step = sum(e[0] == "issue" for e in self.events) + 1
        self.events.append(("issue", step))
        return state, {**m, "nonfinite": _Flag(m["nonfinite"], step, self.events)}


def test_trainer_reads_a_step_only_after_issuing_the_next(setup_dirs, tmp_path):
    """Reading a step's metrics waits for it; the next step is queued first, so the device is
    never idle while the host does a step's bookkeeping (evaluation and the last step aside)."""
    cfg = make_config(*setup_dirs, num_steps=5, eval_every_steps=3, log_every_steps=1)
    trainer = Trainer(cfg, str(tmp_path / "run"))
    events = []
    trainer.runner = RecordingRunner(trainer.runner, events)
    trainer.run()
    first_read = [events.index(("read", s)) for s in range(1, 6)]
    issued = [events.index(("issue", s)) for s in range(1, 6)]
    # Steps 1, 2 and 4 are read after the next one is issued; step 3 before its evaluation,
    # step 5 (the last) before the final one.
    for s in (1, 2, 4):
        assert issued[s] < first_read[s - 1], events
    assert first_read[2] < issued[3] and first_read[4] > issued[4], events
    rows = [r for r in log_lib.read_metrics(str(tmp_path / "run")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["nonfinite"] == 0.0 for r in rows)


@pytest.mark.slow
def test_same_seed_same_metrics(setup_dirs, reference, tmp_path):
    """Again, with the training batches read ahead on 3 threads (the reference reads them
    inline, the CPU default): the same run."""
    workdir = str(tmp_path / "again")
    cfg = make_config(*setup_dirs, **_SETTINGS, prefetch_threads=3)
    trainer = Trainer(cfg, workdir)
    assert trainer.feed.threads == 3
    trainer.run()
    assert_same_run(workdir, reference)


def test_throughput_counts_the_real_tokens_of_the_steps_it_times(setup_dirs, reference, tmp_path):
    """A train row's tokens/s over its steps/s (one clock: it cancels) is the real tokens per
    step of the batches since the previous train row or evaluation: the step's ``units``."""
    trainer = Trainer(make_config(*setup_dirs, **_SETTINGS), str(tmp_path / "run"))
    logged = log_lib.read_metrics(reference)
    bounds = sorted({r["step"] for r in logged if r["split"] in ("train", "validation")} | {0})
    train = [r for r in logged if r["split"] == "train"]
    assert len(train) >= 3
    for r in train:
        since = max(b for b in bounds if b < r["step"])
        real = [int(batch_units(trainer.train_ds[i])[1]) for i in range(since, r["step"])]
        padded = trainer.train_ds[since]["attention_mask"].size
        assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(np.mean(real), rel=1e-9)
        assert 0 < np.mean(real) < padded  # padding is not counted


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_starts_clean(setup_dirs, reference, tmp_path):
    """A run killed before any checkpoint finished left metrics rows behind; the restart begins
    at step 0 and must not keep them."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(os.path.join(reference, "metrics.jsonl"), workdir / "metrics.jsonl")
    Trainer(make_config(*setup_dirs, **_SETTINGS), str(workdir)).run()
    assert_same_run(str(workdir), reference)


class CrashingTrainer(Trainer):
    """Fails when reading the batch of ``crash_at`` (an OOM, a bug, a kill)."""

    crash_at = None

    def _batch(self, step):
        if step == self.crash_at:
            raise RuntimeError("crashed before the first checkpoint")
        return super()._batch(step)


def test_restart_with_another_seed_after_a_crash_before_any_checkpoint(setup_dirs, tmp_path):
    """Nothing to resume, so nothing of the crashed attempt is checked against: a fresh start
    drops its rows, the epoch-0 data hash too (a corrected seed or data file then runs)."""
    workdir = str(tmp_path / "run")
    crashing = CrashingTrainer(make_config(*setup_dirs, num_steps=4, eval_every_steps=4), workdir)
    crashing.crash_at = 2
    with pytest.raises(RuntimeError, match="crashed before the first checkpoint"):
        crashing.run()
    first = [r for r in log_lib.read_metrics(workdir) if r["split"] == "data"]
    cfg = make_config(*setup_dirs, num_steps=4, eval_every_steps=4)
    with cfg.unlocked():
        cfg.seed = 1
    Trainer(cfg, workdir).run()
    data = [r for r in log_lib.read_metrics(workdir) if r["split"] == "data"]
    assert len(first) == len(data) == 1 and first[0]["row_order_hash"] != data[0]["row_order_hash"]
    train = [r["step"] for r in log_lib.read_metrics(workdir) if r["split"] == "train"]
    assert train == [1, 2, 3, 4]


def test_bad_data_stops_before_the_workdir_is_made(setup_dirs, tmp_path):
    """A validation file with a label the training file lacks stops the run naming file, line
    and field, and leaves no (empty) run directory behind."""
    bad = tmp_path / "validation.csv"
    bad.write_text("text,label\nso good,positive\nwhat,surprised\n")
    workdir = tmp_path / "run"
    cfg = make_config(*setup_dirs, **{"data.validation_file": str(bad)})
    with pytest.raises(ValueError, match=rf"{bad}, line 3, field 'label'"):
        Trainer(cfg, str(workdir))
    assert not workdir.exists()
