"""The input-pipeline throughput measurement reads real batches and counts them."""

import pytest

from sft_jax.pipeline_speed import pipeline_throughput
from tests.tiny_image import make_image_config, make_tiny_resnet, write_image_folders
from tests.tiny_text import make_config, make_tiny_setup


@pytest.mark.slow
def test_pipeline_throughput_counts_batches(tmp_path):
    cfg = make_config(*make_tiny_setup(tmp_path))
    out = pipeline_throughput(cfg, num_batches=5)
    assert out["num_batches"] == 5 and out["batch_shape"][0] == 8
    assert out["examples_per_s"] == pytest.approx(8 * out["batches_per_s"])
    assert 0 < out["tokens_per_s"] < out["examples_per_s"] * out["batch_shape"][1] + 1e-6
    assert out["setup_s"] > 0


@pytest.mark.slow
def test_pipeline_throughput_of_image_folders(tmp_path):
    dirs = write_image_folders(tmp_path / "images")
    model_dir = make_tiny_resnet(tmp_path / "resnet")  # the pipeline reads its image processor
    cfg = make_image_config(tmp_path, model_dir, dirs)
    out = pipeline_throughput(cfg, num_batches=3)
    assert out["batch_shape"] == [8, 16, 16, 3] and "tokens_per_s" not in out
    assert out["images_per_s"] == pytest.approx(out["examples_per_s"])  # training: full batches
    assert out["examples_per_s"] == pytest.approx(8 * out["batches_per_s"])
