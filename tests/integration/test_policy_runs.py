"""Issue 5's policies and optimizers through the real trainer on a tiny BERT: ``lora:R`` inserts
adapters and trains only them and the head (exported merged to transformers); LLRD with WSD,
schedule-free AdamW and Muon train; gradual unfreezing resumes exactly."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from sft_jax import logging as log_lib
from sft_jax.restore import restore_run
from sft_jax.trainer import Trainer
from tests.tiny_text import make_config, make_tiny_setup


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("policies"))


def configure(setup_dirs, **keys):
    cfg = make_config(*setup_dirs)
    cfg.unlock()
    cfg.mesh.shape = (1, 1, 1)
    for key, value in keys.items():
        section, name = key.split("__")
        cfg[section][name] = value
    cfg.lock()
    return cfg


@pytest.mark.slow
def test_lora_policy_trains_adapters_and_head_and_exports_merged(setup_dirs, tmp_path):
    cfg = configure(setup_dirs, freeze__policy="lora:4")
    workdir = tmp_path / "lora"
    Trainer(cfg, str(workdir)).run()
    info = json.loads((workdir / "run.json").read_text())
    # 2 layers x 6 projections x rank 4 x (in + out), and the 32 -> 3 classifier.
    adapters = 2 * 4 * (3 * (32 + 32) + (32 + 32) + (32 + 64) + (64 + 32))
    assert info["num_trainable_params"] == adapters + 32 * 3 + 3
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "experiments.export", "--workdir", str(workdir),
                    "--out", str(out), "--checkpoint", "latest"], check=True,
                   capture_output=True)  # fmt: skip
    from sft_jax.lora import merge_lora

    ours = merge_lora(restore_run(str(workdir), "latest").model)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = np.array([[101, 2307, 2293, 102]], np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jax.numpy.asarray(ids))), ref, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "keys",
    [
        dict(freeze__policy="llrd:0.8", optimizer__schedule="wsd"),
        dict(optimizer__name="schedule_free_adamw", optimizer__schedule="constant"),
        dict(optimizer__name="muon", optimizer__learning_rate=3e-3),
    ],
    ids=["llrd-wsd", "schedule-free", "muon"],
)
def test_policies_and_optimizers_train(setup_dirs, tmp_path, keys):
    cfg = configure(setup_dirs, **keys)
    Trainer(cfg, str(tmp_path / "run")).run()
    losses = [
        r["loss"] for r in log_lib.read_metrics(str(tmp_path / "run")) if r["split"] == "train"
    ]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.slow
def test_gradual_unfreezing_resumes_exactly(setup_dirs, tmp_path):
    """The unfreezing schedule lives in the optimizer state: a resumed run continues it."""
    cfg = configure(setup_dirs, freeze__policy="gradual_unfreeze:2")
    full = Trainer(cfg, str(tmp_path / "full")).run()
    part = str(tmp_path / "part")
    Trainer(cfg, part).run(stop_after_step=3)
    assert Trainer(cfg, part).run() == full


@pytest.mark.slow
def test_schedule_free_checkpoint_holds_the_evaluated_average_and_resumes(setup_dirs, tmp_path):
    """Schedule-Free validates at its averaged point: the checkpoint's parameters (what
    evaluation and export restore) are that point, and resuming continues the trained one."""
    from sft_jax.eval_run import evaluate_model

    cfg = configure(setup_dirs, optimizer__name="schedule_free_adamw",
                    optimizer__schedule="constant", optimizer__learning_rate=1e-2)  # fmt: skip
    full = Trainer(cfg, str(tmp_path / "full")).run()
    run = restore_run(str(tmp_path / "full"), "latest")
    again = evaluate_model(run.cfg, run.model, "validation", label_names=run.info["label_names"])
    for key in ("loss", "accuracy", "macro_f1"):
        assert again[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    with run.cfg.unlocked():
        run.cfg.train.prefetch_threads = 2  # batches read ahead: the same evaluation
    ahead = evaluate_model(run.cfg, run.model, "validation", label_names=run.info["label_names"])
    assert ahead == again
    part = str(tmp_path / "part")
    Trainer(cfg, part).run(stop_after_step=3)
    assert Trainer(cfg, part).run() == full
