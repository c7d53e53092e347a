"""The input-pipeline throughput measurement reads real batches and counts them."""

import pytest

from sft_jax.pipeline_speed import pipeline_throughput
from tests.tiny_text import make_config, make_tiny_setup


@pytest.mark.slow
def test_pipeline_throughput_counts_batches(tmp_path):
    cfg = make_config(*make_tiny_setup(tmp_path))
    out = pipeline_throughput(cfg, num_batches=5)
    assert out["num_batches"] == 5 and out["batch_shape"][0] == 8
    assert out["examples_per_s"] == pytest.approx(8 * out["batches_per_s"])
    assert 0 < out["tokens_per_s"] < out["examples_per_s"] * out["batch_shape"][1] + 1e-6
    assert out["setup_s"] > 0
