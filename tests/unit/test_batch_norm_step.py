"""The train step with BatchNorm: running statistics are part of the state, never trained,
updated exactly as torch's running averages (also with accumulation, and synchronized over
devices under pmap), and frozen
(inference mode) where the freezing policy freezes the layer."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import image_cls
from sft_jax import freezing, optim, sharding, steps, tree_util
from sft_jax.models import remat
from sft_jax.tasks import ImageClassificationTask
from sft_jax.train_state import (
    StepSetup,
    create_train_state,
    shardings_of,
    split_model,
    stats_mask,
)
from tests.tiny_image import TinyImageClassifier, image_batch


def build(policy="full", accumulation=1, bn_mode="auto", mode="jit", lr=0.05):
    cfg = image_cls.get_config().optimizer
    cfg.unlock()
    cfg.update(learning_rate=lr, warmup_ratio=0.0, schedule="constant")
    model = TinyImageClassifier()
    _, params = split_model(model)
    stats = stats_mask(model)
    mask = freezing.trainable_mask(params, policy, structure=model.layer_structure, never=stats)
    freezing.configure_batch_norm(model, mask, bn_mode)
    graphdef, _ = split_model(model)
    tx, lr_fn = optim.build_optimizer(cfg, mask, total_steps=100)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state = create_train_state(model, tx, mesh, seed=0)
    setup = StepSetup(
        graphdef, tx, mask, lr_fn, mesh, shardings_of(state), sharding.batch_sharding(mesh),
        stats=stats,
    )  # fmt: skip
    task = ImageClassificationTask()
    if mode == "pmap":
        return state, setup, steps.make_pmap_train_step(setup, task, accumulation)
    return state, setup, steps.make_train_step(setup, task, accumulation)


def forward_stats(params, batches, graphdef):
    """BatchNorm statistics after training-mode forward passes over ``batches`` in order."""
    model = nnx.merge(graphdef, params)
    for b in batches:
        model(b["pixel_values"], train=True)
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def stat_leaves(params, stats):
    flat, mask = tree_util.flatten_to_dict(params), tree_util.flatten_to_dict(stats)
    return {p: np.asarray(v) for p, v in flat.items() if mask[p]}


def test_running_statistics_are_state_not_trained_and_updated_by_the_forward_pass():
    state, setup, step_fn = build()
    start = jax.tree.map(np.asarray, state.params)
    batch = image_batch()
    expected = tree_util.flatten_to_dict(forward_stats(start, [batch], setup.graphdef))
    assert len(expected) == 6  # mean and var of 3 BatchNorms
    assert not any(
        m for p, m in tree_util.flatten_to_dict(setup.trainable).items() if p in expected
    )
    # The optimizer keeps no state for the statistics: its param-shaped leaves are the 10 weights.
    n_state = tree_util.count(state.opt_state)
    n_learned = tree_util.count(start, jax.tree.map(lambda m: not m, setup.stats))
    assert n_state == 2 * n_learned + 2  # adam's mu and nu (+ two step counters)
    state, metrics = step_fn(state, sharding.put_batch(batch, setup.batch_sharding))
    got = stat_leaves(state.params, setup.stats)
    for path, value in expected.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7)
        assert not np.allclose(got[path], tree_util.flatten_to_dict(start)[path])
    # param_norm counts the learned weights only.
    learned = [np.asarray(p) for p, m in zip(jax.tree.leaves(state.params),
                                             jax.tree.leaves(setup.stats)) if not m]  # fmt: skip
    norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in learned))
    np.testing.assert_allclose(float(metrics["param_norm"]), norm, rtol=1e-5)


def test_accumulation_updates_statistics_micro_batch_after_micro_batch():
    state, setup, step_fn = build(accumulation=2)
    start = jax.tree.map(np.asarray, state.params)
    batch = image_batch(batch_size=8)
    # Micro-batch i holds rows i, i + 2, i + 4, ... (steps._micro_batches).
    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    expected = tree_util.flatten_to_dict(forward_stats(start, halves, setup.graphdef))
    state, _ = step_fn(state, sharding.put_batch(batch, setup.batch_sharding))
    got = stat_leaves(state.params, setup.stats)
    for path, value in expected.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7)


def test_frozen_base_runs_batch_norm_in_inference_mode():
    state, setup, step_fn = build(policy="head_only")
    start = jax.tree.map(np.asarray, state.params)
    for i in range(3):
        state, m = step_fn(state, sharding.put_batch(image_batch(seed=i), setup.batch_sharding))
    flat0, flat1 = tree_util.flatten_to_dict(start), tree_util.flatten_to_dict(state.params)
    changed = sorted(p for p in flat0 if not np.array_equal(flat0[p], np.asarray(flat1[p])))
    assert changed == ["classifier/dense/bias", "classifier/dense/kernel"]  # stats untouched too
    # In training the frozen base computes exactly what it computes at inference.
    model = nnx.merge(setup.graphdef, start)
    x = image_batch()["pixel_values"]
    np.testing.assert_array_equal(model(x, train=True), model(x, train=False))


def test_batch_norm_modes_and_partial_freezing():
    model = TinyImageClassifier()
    _, params = split_model(model)
    never = stats_mask(model)
    mask = freezing.trainable_mask(
        params, "train_top:1", structure=model.layer_structure, never=never
    )
    assert freezing.configure_batch_norm(model, mask, "auto") == 2  # stem + block 0 frozen
    assert model.backbone.stem.bn.frozen and model.backbone.blocks[0].bn.frozen
    assert not model.backbone.blocks[1].bn.frozen
    assert freezing.configure_batch_norm(model, mask, "train") == 0
    assert freezing.configure_batch_norm(model, mask, "frozen") == 3
    with pytest.raises(ValueError, match="model.batch_norm='sometimes'"):
        freezing.configure_batch_norm(model, mask, "sometimes")


@pytest.mark.parametrize("policy", ["none", "full"])
def test_pmap_synchronizes_batch_norm_as_jit_over_the_global_batch(policy):
    """pmap over 2 devices (4 images each) = jit on one device (8 images): BatchNorm normalizes
    with, and updates its running statistics from, the statistics of all 8 images; also where
    the blocks are recomputed in the backward pass (``remat=full``: the recomputation opens
    the forward pass's BatchNorm axis too; without it the parameters here differ by 0.07)."""
    with remat.REMAT.scope(policy):
        _check_pmap_matches_jit()


def _check_pmap_matches_jit():
    devices = jax.devices()[:2]
    batch = image_batch(batch_size=8)
    state, setup, step_fn = build()
    start = jax.tree.map(np.asarray, state.params)
    expected = tree_util.flatten_to_dict(forward_stats(start, [batch], setup.graphdef))
    one, m_one = step_fn(state, sharding.put_batch(batch, setup.batch_sharding))
    state, setup, pmap_fn = build(mode="pmap")
    out, m_pmap = pmap_fn(sharding.replicate(state, devices), sharding.pmap_batch(batch, 2))
    copies = [jax.tree.map(lambda x, d=d: np.asarray(x)[d], out.params) for d in range(2)]
    jax.tree.map(np.testing.assert_array_equal, copies[0], copies[1])
    np.testing.assert_allclose(np.asarray(m_pmap["loss"])[0], float(m_one["loss"]), rtol=1e-6)
    got = stat_leaves(copies[0], setup.stats)
    for path, value in expected.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 copies[0], jax.device_get(one.params))  # fmt: skip
