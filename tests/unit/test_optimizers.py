"""Every optimizer from config in the real train step (learns; frozen parameters bit-identical and
stateless), decoupled weight decay with multipliers, Muon's split, Schedule-Free evaluation
parameters, the WSD schedule, and error messages."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import text_cls
from sft_jax import freezing, optim, optimizers, sharding, steps, tree_util
from sft_jax.tasks import ClassificationTask
from sft_jax.train_state import StepSetup, TrainState, create_train_state
from tests.toy import ToyClassifier, toy_batch

# Learning rates at which each optimizer halves the toy loss quickly.
LR = {
    "adamw": 0.05, "adam": 0.05, "sgd": 0.5, "sgd_nesterov": 0.5, "adafactor": 0.05,
    "lion": 0.01, "lamb": 0.05, "muon": 0.05, "schedule_free_adamw": 0.05,
}  # fmt: skip


def opt_cfg(**kw) -> ml_collections.ConfigDict:
    c = text_cls.get_config().optimizer
    c.unlock()
    c.update(warmup_ratio=0.0, schedule="constant")
    c.update(kw)
    return c


def cfg_for(name: str) -> ml_collections.ConfigDict:
    if name == "sgd_nesterov":
        return opt_cfg(name="sgd", nesterov=True, learning_rate=LR[name])
    return opt_cfg(name=name, learning_rate=LR[name])


@pytest.mark.parametrize("name", sorted(LR))
def test_optimizer_learns_and_frozen_params_stay_bit_identical(name):
    """Embeddings frozen by an explicit rule; the dense layer and the head train (the dense
    kernel is Muon's matrix, the head goes to Adam)."""
    model = ToyClassifier(dropout=0.0)
    graphdef, params = nnx.split(model, nnx.Param)
    params = params.to_pure_dict()
    groups = freezing.param_groups(params, [("^embeddings/", False)])
    cfg = cfg_for(name)
    tx, lr_fn = optim.build_optimizer(cfg, groups, total_steps=100)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    # One device: the state needs no placement (create_train_state: see the test below).
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                       jax.random.key_data(jax.random.key(0)))  # fmt: skip
    setup = StepSetup(graphdef, tx, groups.trainable, lr_fn, mesh, None,
                      sharding.batch_sharding(mesh))  # fmt: skip
    step_fn = steps.make_train_step(setup, ClassificationTask())
    before = jax.device_get(state.params)
    frozen_shape = before["embeddings"]["embedding"].shape  # (50, 16): no other leaf has it
    batch = sharding.put_batch(toy_batch(), setup.batch_sharding)
    losses = []
    for _ in range(20):
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(
        before["embeddings"]["embedding"], after["embeddings"]["embedding"]
    )
    assert not np.array_equal(before["dense"]["kernel"], after["dense"]["kernel"])
    assert not any(x.shape == frozen_shape for x in jax.tree.leaves(state.opt_state))
    assert losses[-1] < 0.6 * losses[0], losses
    # Evaluation parameters: the Schedule-Free average, the trained params otherwise.
    evaluated = optim.eval_params(cfg, state.opt_state, state.params)
    same = jax.tree.map(np.array_equal, evaluated, jax.device_get(state.params))
    assert all(jax.tree.leaves(same)) == (name != "schedule_free_adamw")
    np.testing.assert_array_equal(
        evaluated["embeddings"]["embedding"], before["embeddings"]["embedding"]
    )


PARAMS = {
    "bert": {
        "embeddings": {"word_embeddings": {"embedding": jnp.full((10, 4), 2.0)},
                       "LayerNorm": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
        "encoder": {"layer": {0: {"dense": {"kernel": jnp.full((4, 4), 3.0),
                                           "bias": jnp.ones(4)}}}},
    },
    "classifier": {"kernel": jnp.full((4, 3), 5.0), "bias": jnp.ones(3)},
}  # fmt: skip


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "muon"])
def test_decoupled_weight_decay_with_multipliers(name):
    """With zero gradients only decay moves a parameter: -lr * lr_mult * wd * wd_mult * p on
    matrices and embeddings, nothing on biases and norms."""
    rules = [("^classifier/", True, 2.0, 0.5), ("^bert/embeddings/", True, 1.0, 0.0)]
    groups = freezing.param_groups(PARAMS, rules)
    cfg = opt_cfg(name=name, learning_rate=0.1, weight_decay=0.01, grad_clip_norm=0.0)
    tx, _ = optim.build_optimizer(cfg, groups, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    u = tree_util.flatten_to_dict(updates)
    np.testing.assert_allclose(u["classifier/kernel"], -0.1 * 2.0 * 0.01 * 0.5 * 5.0, rtol=1e-6)
    np.testing.assert_allclose(u["bert/encoder/layer/0/dense/kernel"], -0.1 * 0.01 * 3.0, rtol=1e-6)
    for path in ("bert/embeddings/word_embeddings/embedding", "classifier/bias",
                 "bert/embeddings/LayerNorm/scale", "bert/encoder/layer/0/dense/bias"):  # fmt: skip
        np.testing.assert_array_equal(u[path], 0.0)


def test_muon_orthogonalizes_hidden_matrices_only():
    specs = optimizers.muon_dimension_numbers(PARAMS)
    is_spec = lambda x: isinstance(x, optax.contrib.MuonDimensionNumbers)
    # None leaves (Adam) vanish from the tree; only the hidden kernel is Muon's.
    assert jax.tree.leaves(specs, is_leaf=is_spec) == [optax.contrib.MuonDimensionNumbers((0,), 1)]
    assert is_spec(specs["bert"]["encoder"]["layer"][0]["dense"]["kernel"])
    conv = optimizers.muon_dimension_numbers({"conv": {"kernel": jnp.ones((3, 3, 2, 4))}})
    assert conv["conv"]["kernel"] == optax.contrib.MuonDimensionNumbers((0, 1, 2), 3)
    tx, _ = optim.build_optimizer(opt_cfg(name="muon"), jax.tree.map(lambda _: True, PARAMS), 10)
    state = tx.init(PARAMS)
    is_muon = lambda x: isinstance(x, optax.contrib.MuonState)
    muon_mu = [s.mu for s in jax.tree.leaves(state, is_leaf=is_muon) if is_muon(s)]
    assert [x.shape for x in jax.tree.leaves(muon_mu)] == [(4, 4)]


def test_schedule_free_eval_params_match_optax():
    cfg = opt_cfg(name="schedule_free_adamw", learning_rate=0.1, grad_clip_norm=0.0)
    tx, _ = optim.build_optimizer(cfg, jax.tree.map(lambda _: True, PARAMS), 10)
    params, state = PARAMS, tx.init(PARAMS)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    is_sf = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)
    (sf,) = [s for s in jax.tree.leaves(state, is_leaf=is_sf) if is_sf(s)]
    want = optax.contrib.schedule_free_eval_params(sf, params)
    got = optim.eval_params(cfg, state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert optim.eval_params(opt_cfg(), state, params) is params


def test_wsd_schedule_exact():
    cfg = opt_cfg(learning_rate=1.0, schedule="wsd", warmup_steps=2, decay_ratio=0.4)
    lr = optim.schedule(cfg, total_steps=10)
    np.testing.assert_allclose(
        [float(lr(s)) for s in range(11)],
        [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0],
    )
    cfg.decay_shape = "sqrt"
    lr = optim.schedule(cfg, total_steps=10)
    np.testing.assert_allclose(
        [float(lr(s)) for s in (5, 6, 7, 8, 9, 10)],
        [1.0, 1.0, 1 - 0.5, 1 - np.sqrt(0.5), 1 - np.sqrt(0.75), 0.0],
        rtol=1e-6,
    )


def test_group_schedules_are_multiplied():
    groups = freezing.param_groups(PARAMS, [("^classifier/", True, 3.0, 1.0)])
    cfg = opt_cfg(name="sgd", momentum=0.0, learning_rate=1.0, schedule="linear",
                  warmup_steps=0, grad_clip_norm=0.0)  # fmt: skip
    tx, _ = optim.build_optimizer(cfg, groups, total_steps=4)
    ones = jax.tree.map(jnp.ones_like, PARAMS)
    state, got = tx.init(PARAMS), []
    for _ in range(4):
        updates, state = tx.update(ones, state, PARAMS)
        flat = tree_util.flatten_to_dict(updates)
        got.append(
            (float(flat["classifier/bias"][0]), float(flat["bert/encoder/layer/0/dense/bias"][0]))
        )
    np.testing.assert_allclose(got, [(-3.0, -1.0), (-2.25, -0.75), (-1.5, -0.5), (-0.75, -0.25)])


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(name="adamax"),
            "optimizer.name='adamax'; supported optimizers: adamw, adam, sgd, "
            "adafactor, lion, lamb, muon, schedule_free_adamw",
        ),
        (
            dict(schedule="step"),
            "optimizer.schedule='step'; use one of constant, linear, cosine, wsd",
        ),
        (
            dict(schedule="wsd", warmup_steps=8, decay_ratio=0.5),
            r"wsd: warmup \(8 steps\) \+ decay",
        ),
        (dict(schedule="wsd", decay_shape="cubic"), "optimizer.decay_shape='cubic'"),
        (dict(name="schedule_free_adamw", schedule="linear"), "set optimizer.schedule=constant"),
        (dict(name="sgd", momentum=0.0, nesterov=True), "nesterov=True needs optimizer.momentum"),
    ],
)
def test_optimizer_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        optim.build_optimizer(opt_cfg(**kw), jax.tree.map(lambda _: True, PARAMS), 10)


@pytest.mark.parametrize("name", sorted(LR))
def test_create_train_state_places_every_optimizer_state(name):
    model = ToyClassifier(dropout=0.0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    groups = freezing.param_groups(params, [("^embeddings/", False)])
    tx, _ = optim.build_optimizer(cfg_for(name), groups, total_steps=10)
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    state = create_train_state(model, tx, mesh, seed=0)
    assert jax.tree.leaves(state.opt_state)
