"""Orbax checkpoints: exact round trip, latest + best-k retention, params-only restore."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sft_jax import checkpoint as ckpt
from sft_jax.train_state import TrainState, abstract_of
from tests.unit.test_steps import build, run


def test_round_trip_and_retention(tmp_path):
    state, setup, step_fn = build(policy="head_only")
    opts = ckpt.CheckpointOptions(
        keep_latest=1, keep_best=2, best_metric="f1", best_mode="max", async_save=True
    )
    mngr = ckpt.make_manager(str(tmp_path / "ckpt"), opts)
    scores = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6, 5: 0.2}
    saved = {}
    for step, score in scores.items():
        state, _ = run(state, setup, step_fn, n=1)
        ckpt.save(mngr, state, {"next_batch": step}, metrics={"f1": score})
        saved[step] = jax.device_get(state)
    mngr.wait_until_finished()
    # Best two (steps 2 and 3) plus the latest (5).
    assert sorted(mngr.all_steps()) == [2, 3, 5]
    assert ckpt.best_step(mngr, opts) == 2
    assert ckpt.resolve_step(mngr, "best", opts) == 2
    assert ckpt.resolve_step(mngr, "latest", opts) == 5
    with pytest.raises(ValueError, match="one of the kept steps"):
        ckpt.resolve_step(mngr, "4", opts)

    mngr2 = ckpt.make_manager(str(tmp_path / "ckpt"), opts)  # a fresh process would do this
    restored, progress = ckpt.restore_train_state(mngr2, 3, state)
    assert progress == {"next_batch": 3}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved[3])
    params = ckpt.restore_params(mngr2, 2, abstract_of(state.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[2].params)
    # The restored state trains on: the step function accepts it unchanged.
    restored, _ = run(restored, setup, step_fn, n=1)
    assert int(restored.step) == 4


def test_no_checkpoints_is_a_clear_error(tmp_path):
    mngr = ckpt.make_manager(str(tmp_path / "empty"), ckpt.CheckpointOptions())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        ckpt.resolve_step(mngr, "latest", ckpt.CheckpointOptions())


def test_early_stopping_bookkeeping_and_nan_metrics():
    from sft_jax.trainer import track_best

    progress = {"best": None, "evals_since_best": 0, "stopped_early": False}
    for value, best, since, stop in [
        (float("nan"), None, 1, False),  # a NaN never becomes the best
        (0.5, 0.5, 0, False),
        (0.4, 0.5, 1, False),
        (float("nan"), 0.5, 2, True),  # patience 2: two evaluations without improvement
    ]:
        track_best(progress, value, "max", patience=2)
        assert (progress["best"], progress["evals_since_best"]) == (best, since)
        assert progress["stopped_early"] is stop
    progress = {"best": 1.0, "evals_since_best": 0, "stopped_early": False}
    track_best(progress, 0.9, "min", patience=0)
    assert progress == {"best": 0.9, "evals_since_best": 0, "stopped_early": False}


def _abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def test_a_checkpoint_older_than_a_parameter_layout_change_is_refused(tmp_path):
    """GPT-2's c_attn columns changed order with the same path and shape (layout version 2):
    a checkpoint written before layout versions (no ``layout_version`` in its progress: 1)
    holding one is refused by name; one without such parameters restores; a checkpoint
    written now restores, and its progress comes back as the trainer gave it."""
    c_attn = np.arange(12.0, dtype=np.float32).reshape(2, 6)
    gpt2 = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": c_attn}}}}}}
    bert = {"bert": {"pooler": {"dense": {"kernel": c_attn}}}}
    opts = ckpt.CheckpointOptions(keep_best=0, async_save=False)
    for name, params in (("gpt2", gpt2), ("bert", bert)):
        mngr = ckpt.make_manager(str(tmp_path / name), opts)
        mngr.save(1, args=ocp.args.Composite(  # as the code before layout versions wrote it
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave({"step": np.int32(1)}),
            progress=ocp.args.JsonSave({"next_batch": 1}),
        ))  # fmt: skip
        mngr.wait_until_finished()
        if name == "bert":
            restored = ckpt.restore_params(mngr, 1, _abstract(params))
            np.testing.assert_array_equal(restored["bert"]["pooler"]["dense"]["kernel"], c_attn)
            continue
        with pytest.raises(
            ckpt.CheckpointMismatchError,
            match=r"layout version 1, before version 2: GPT-2.*transformer/h/0/attn/c_attn/kernel",
        ):
            ckpt.restore_params(mngr, 1, _abstract(params))
    state = TrainState(
        step=jnp.int32(2), params=gpt2, opt_state={}, rng=jnp.zeros(2, jnp.uint32)
    )  # fmt: skip
    mngr = ckpt.make_manager(str(tmp_path / "now"), opts)
    ckpt.save(mngr, state, {"next_batch": 2})
    mngr.wait_until_finished()
    restored = ckpt.restore_params(mngr, 2, _abstract(gpt2))
    np.testing.assert_array_equal(
        restored["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"], c_attn
    )
    _, progress = ckpt.restore_train_state(mngr, 2, jax.device_put(state))
    assert progress == {"next_batch": 2}
    # A layout from newer code is refused, whatever the parameters.
    mngr = ckpt.make_manager(str(tmp_path / "newer"), opts)
    mngr.save(1, args=ocp.args.Composite(
        params=ocp.args.StandardSave(bert),
        train=ocp.args.StandardSave({"step": np.int32(1)}),
        progress=ocp.args.JsonSave({"next_batch": 1, "layout_version": ckpt.LAYOUT_VERSION + 1}),
    ))  # fmt: skip
    mngr.wait_until_finished()
    with pytest.raises(ckpt.CheckpointMismatchError, match="update the code"):
        ckpt.restore_params(mngr, 1, _abstract(bert))
