"""End to end on a tiny random Hugging Face ResNet and tiny image folders: train with
augmentation and BatchNorm updates (data parallel over 8 devices), stop + resume equals an
uninterrupted run, evaluate from the run directory, export to transformers, plot the curves;
frozen-base and from-scratch variants."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from sft_jax import logging as log_lib
from sft_jax import tree_util
from sft_jax.pretrained import load_pretrained
from sft_jax.restore import restore_run
from sft_jax.train_state import split_model
from sft_jax.trainer import Trainer
from tests.tiny_image import make_image_config, make_tiny_resnet, write_image_folders


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_e2e")
    return root, make_tiny_resnet(root / "resnet"), write_image_folders(root / "images")


def rows(workdir):
    timing = ("images_per_sec", "steps_per_sec")
    return [{k: v for k, v in r.items() if k not in timing} for r in log_lib.read_metrics(workdir)]


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          check=True)  # fmt: skip


@pytest.mark.slow
def test_train_resume_evaluate_export_plot(setup, tmp_path):
    root, model_dir, dirs = setup
    cfg = make_image_config(root, model_dir, dirs)
    full_dir, part = str(tmp_path / "full"), str(tmp_path / "part")
    full = Trainer(cfg, full_dir).run()
    assert full["num_examples"] == 12 and len(full["confusion_matrix"]) == 3
    train = [r for r in log_lib.read_metrics(full_dir) if r["split"] == "train"]
    assert train[0]["images_per_sec"] > 0 and train[-1]["loss"] < train[0]["loss"]

    Trainer(cfg, part).run(stop_after_step=4)
    assert Trainer(cfg, part).run() == full
    assert rows(part) == rows(full_dir)  # augmentation and BatchNorm statistics resume exactly
    start = restore_run(str(tmp_path / "part"), "latest")
    assert start.step == 6

    out = run_module("experiments.evaluate", "--workdir", part, "--split", "test",
                     "--checkpoint", "latest")  # fmt: skip
    result = json.loads((tmp_path / "part" / "eval_test.json").read_text())
    assert result["num_examples"] == 12 and "accuracy" in out.stdout

    export_dir = tmp_path / "export"
    run_module("experiments.export", "--workdir", part, "--out", str(export_dir),
               "--checkpoint", "latest")  # fmt: skip
    hf = transformers.AutoModelForImageClassification.from_pretrained(export_dir).eval()
    assert hf.config.id2label == {0: "blue", 1: "green", 2: "red"}
    processor = json.loads((export_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 16}
    assert processor["crop_size"] == {"height": 16, "width": 16}
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    np.testing.assert_allclose(np.asarray(start.model(jax.numpy.asarray(x))), ref, atol=1e-5)

    run_module("experiments.plot", "--workdir", part)
    assert (tmp_path / "part" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_frozen_base_with_mlp_head_and_training_from_scratch(setup, tmp_path):
    root, model_dir, dirs = setup
    probe = make_image_config(root, model_dir, dirs, "debug,head256")
    Trainer(probe, str(tmp_path / "probe")).run()
    run = restore_run(str(tmp_path / "probe"), "latest")
    trained = tree_util.flatten_to_dict(split_model(run.model)[1])
    base = load_pretrained(model_dir, task="image_classification", num_labels=3)
    original = tree_util.flatten_to_dict(split_model(base)[1])
    backbone = [p for p in original if p.startswith("resnet/")]
    assert backbone and all(np.array_equal(trained[p], original[p]) for p in backbone)
    assert set(p.split("/")[1] for p in trained if p.startswith("classifier/")) == {
        "hidden", "dense"}  # fmt: skip

    scratch = make_image_config(root, model_dir, dirs, "debug,scratch")
    Trainer(scratch, str(tmp_path / "scratch")).run()
    info = json.loads((tmp_path / "scratch" / "run.json").read_text())
    assert info["num_trainable_params"] == info["num_params"]
    first = restore_run(str(tmp_path / "scratch"), "latest")
    weights = tree_util.flatten_to_dict(split_model(first.model)[1])
    kernel = "resnet/embedder/embedder/convolution/kernel"
    assert not np.allclose(weights[kernel], original[kernel], atol=0.05)
