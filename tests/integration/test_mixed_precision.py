"""Mixed precision from the config: bfloat16 compute, float32 parameters and optimizer state,
float32 loss; the loss trajectory stays close to float32 training."""

import jax
import numpy as np
import pytest
from flax import nnx

from sft_jax import logging as log_lib
from sft_jax.trainer import Trainer
from tests.tiny_text import make_config, make_tiny_setup


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("mixed"))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_state(setup_dirs, tmp_path):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = make_config(*setup_dirs, num_steps=4, eval_every_steps=4, **{"model.dtype": dtype})
        trainer = Trainer(cfg, str(tmp_path / dtype))
        final = trainer.run()
        leaves = jax.tree.leaves((trainer.state.params, trainer.state.opt_state))
        assert {x.dtype.name for x in leaves if x.dtype.kind == "f"} == {"float32"}
        model = nnx.merge(trainer.setup.graphdef, trainer.state.params)
        assert model.config.dtype == dtype and model.config.param_dtype == "float32"
        assert isinstance(final["loss"], float) and np.isfinite(final["loss"])
        rows = log_lib.read_metrics(str(tmp_path / dtype))
        losses[dtype] = [r["loss"] for r in rows if r["split"] == "train"]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=3e-2)
    assert losses["bfloat16"] != losses["float32"]  # it did compute in bfloat16
