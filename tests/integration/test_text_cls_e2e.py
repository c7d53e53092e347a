"""End to end on a tiny random BERT and a tiny CSV dataset: train, stop + resume equals an
uninterrupted run, evaluate from the run directory alone, export to transformers."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from sft_jax import logging as log_lib
from sft_jax.trainer import Trainer
from tests.tiny_text import make_config, make_tiny_setup


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("e2e"))


def losses(workdir):
    return [r["loss"] for r in log_lib.read_metrics(workdir) if r["split"] == "train"]


def train_rows(workdir):
    keys = ("step", "split", "loss", "accuracy", "grad_norm", "macro_f1")
    return [{k: r[k] for k in keys if k in r} for r in log_lib.read_metrics(workdir)]


@pytest.mark.slow
def session_starts(tb_dir: Path) -> list[int]:
    """Steps of the SessionLog START events (TensorBoard's purge markers) in ``tb_dir``."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in tb_dir.glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecords: length (8), its CRC (4), payload, payload CRC (4)
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                steps.append(event.step)
    return steps


def test_train_stop_resume_evaluate_export(setup_dirs, tmp_path):
    root, model_dir, files = setup_dirs
    cfg = make_config(root, model_dir, files)
    full = Trainer(cfg, str(tmp_path / "full")).run()
    assert full["num_examples"] == 30
    rows = log_lib.read_metrics(str(tmp_path / "full"))
    assert all({"step", "split"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if r["split"] == "validation"] == [4, 8]
    assert list((tmp_path / "full" / "tb").glob("events.out.tfevents.*"))

    # Data parallel over the 8 fake devices (the default mesh) equals one device.
    one = make_config(root, model_dir, files)
    one.mesh.shape = (1, 1, 1)
    Trainer(one, str(tmp_path / "one_device")).run()
    np.testing.assert_allclose(
        losses(str(tmp_path / "full")), losses(str(tmp_path / "one_device")), rtol=2e-5
    )

    # Stop after step 6 (between evaluations), then resume in a fresh Trainer.
    part = str(tmp_path / "part")
    Trainer(cfg, part).run(stop_after_step=6)
    assert max(r["step"] for r in log_lib.read_metrics(part)) == 6
    resumed = Trainer(cfg, part).run()
    assert resumed == full
    assert train_rows(part) == train_rows(str(tmp_path / "full"))
    # Its TensorBoard events tell TensorBoard to drop what came after step 6 (none here).
    assert sorted(session_starts(Path(part) / "tb")) == [0, 7]

    # Evaluate from the run directory alone (a separate process).
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            "--workdir",
            part,
            "--split",
            "test",
            "--checkpoint",
            "latest",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads((tmp_path / "part" / "eval_test.json").read_text())
    assert result["checkpoint_step"] == 8 and result["num_examples"] == 30
    assert len(result["confusion_matrix"]) == 3
    assert "macro_f1" in out.stdout

    # experiments.export, then transformers gives the same logits as our restored model.
    from sft_jax.restore import restore_run

    export_dir = tmp_path / "export"
    subprocess.run(
        [sys.executable, "-m", "experiments.export", "--workdir", part, "--out", str(export_dir),
         "--checkpoint", "latest"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    run = restore_run(part, "latest")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    enc = tok(["great love it", "the table today so"], padding=True, return_tensors="np")
    ours = run.model(
        jax.numpy.asarray(enc["input_ids"]),
        attention_mask=enc["attention_mask"],
        token_type_ids=enc["token_type_ids"],
    )
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    assert hf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.slow
def test_early_stopping_and_best_checkpoint(setup_dirs, tmp_path):
    """With a zero learning rate the metric never improves: patience 1 stops at the second
    evaluation. Equal scores tie; the latest of them is "best" (as Orbax's BestN keeps)."""
    root, model_dir, files = setup_dirs
    cfg = make_config(root, model_dir, files, early_stopping_patience=1, eval_every_steps=2)
    cfg.unlock()
    cfg.optimizer.learning_rate = 0.0
    cfg.checkpoint.keep_best = 1
    workdir = str(tmp_path / "stop")
    Trainer(cfg, workdir).run()
    evals = [r["step"] for r in log_lib.read_metrics(workdir) if r["split"] == "validation"]
    assert evals == [2, 4]
    from sft_jax.restore import restore_run

    assert restore_run(workdir, "best").step == 4
    assert restore_run(workdir, "latest").step == 4
    # Running again finds the run complete, does not train further, and reports the last eval.
    again = Trainer(cfg, workdir).run()
    assert again["num_examples"] == 30 and "macro_f1" in again
    assert [r["step"] for r in log_lib.read_metrics(workdir)][-1] == 4
    # With more patience the stopped run goes on from its checkpoint.
    cfg.train.early_stopping_patience = 3
    Trainer(cfg, workdir).run()
    evals = [r["step"] for r in log_lib.read_metrics(workdir) if r["split"] == "validation"]
    assert evals == [2, 4, 6, 8]


@pytest.mark.slow
def test_pmap_mode_trains_resumes_and_checkpoints(setup_dirs, tmp_path):
    """mesh.mode=pmap: the same trainer with a replicated state on the 8 devices; checkpoints
    hold one logical copy, so stop + resume equals an uninterrupted pmap run."""
    cfg = make_config(*setup_dirs, **{"mesh.mode": "pmap"})
    full_dir, part = str(tmp_path / "full"), str(tmp_path / "part")
    full = Trainer(cfg, full_dir).run()
    Trainer(cfg, part).run(stop_after_step=6)
    assert Trainer(cfg, part).run() == full
    assert train_rows(part) == train_rows(full_dir)
    first, *_, last = losses(full_dir)
    assert last < first
    info = json.loads((tmp_path / "full" / "run.json").read_text())
    assert info["num_params"] < 2_000_000  # one copy counted, not one per device
    from sft_jax.restore import restore_run

    assert restore_run(full_dir, "latest").step == 8
