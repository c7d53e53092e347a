"""Mixed precision from the config: bfloat16 or float16 compute, float32 parameters and
optimizer state, float32 loss; the loss trajectory stays close to float32 training. float16
runs with a dynamic loss scale whose overflows are skipped without stopping the run."""

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
def test_half_precision_compute_keeps_float32_state(setup_dirs, tmp_path):
    losses = {}
    for dtype in ("float32", "bfloat16", "float16"):
        cfg = make_config(*setup_dirs, num_steps=4, eval_every_steps=4, **{"model.dtype": dtype})
        trainer = Trainer(cfg, str(tmp_path / dtype))
        final = trainer.run()
        leaves = jax.tree.leaves((trainer.state.params, trainer.state.opt_state))
        assert {x.dtype.name for x in leaves if x.dtype.kind == "f"} == {"float32"}
        model = nnx.merge(trainer.setup.graphdef, trainer.state.params)
        assert model.config.dtype == dtype and model.config.param_dtype == "float32"
        assert isinstance(final["loss"], float) and np.isfinite(final["loss"])
        rows = [r for r in log_lib.read_metrics(str(tmp_path / dtype)) if r["split"] == "train"]
        losses[dtype] = [r["loss"] for r in rows]
        # float16 alone scales its loss (2**16 throughout: no overflow in these steps).
        assert [r.get("loss_scale") for r in rows] == [2.0**16 if dtype == "float16" else None] * 4
    for half in ("bfloat16", "float16"):
        np.testing.assert_allclose(losses[half], losses["float32"], rtol=3e-2)
        assert losses[half] != losses["float32"]  # it did compute in half precision


@pytest.mark.slow
def test_float16_overflows_are_skipped_without_stopping_the_run(setup_dirs, tmp_path):
    """Started at a loss scale of 2**40 the first float16 updates overflow: each is skipped
    and halves the scale, and none counts toward ``train.max_skipped_steps`` (1 here)."""
    cfg = make_config(
        *setup_dirs, num_steps=3, eval_every_steps=3, max_skipped_steps=1,
        **{"model.dtype": "float16", "optimizer.loss_scale_init": 2.0**40},
    )  # fmt: skip
    trainer = Trainer(cfg, str(tmp_path / "run"))
    before = jax.device_get(trainer.state.params)
    trainer.run()
    rows = [r for r in log_lib.read_metrics(str(tmp_path / "run")) if r["split"] == "train"]
    assert [(r["loss_scale"], r["nonfinite"]) for r in rows] == [
        (2.0**40, 1.0), (2.0**39, 1.0), (2.0**38, 1.0)
    ]  # fmt: skip
    assert all(np.isfinite(r["loss"]) for r in rows)
    after = jax.device_get(trainer.runner.canonical(trainer.state).params)
    jax.tree.map(np.testing.assert_array_equal, after, before)
