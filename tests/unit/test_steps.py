"""The pure train step on a toy model: learning, accumulation, data parallelism, freezing."""

import jax
import numpy as np
from flax import nnx

from configs import text_cls
from sft_jax import collectives, freezing, optim, optimizers, sharding, steps
from sft_jax.tasks import ClassificationTask
from sft_jax.train_state import StepSetup, create_train_state, shardings_of
from tests.toy import ToyClassifier, toy_batch


def build(policy="full", mesh_shape=(1, 1, 1), devices=None, accumulation=1, lr=0.05, dropout=0.1,
          total_steps=100, **opt):  # fmt: skip
    cfg = text_cls.get_config().optimizer
    cfg.unlock()
    cfg.update({"learning_rate": lr, "warmup_ratio": 0.0, "schedule": "constant", **opt})
    model = ToyClassifier(dropout=dropout)
    graphdef, params = nnx.split(model, nnx.Param)
    mask = freezing.trainable_mask(params.to_pure_dict(), policy)
    tx, lr_fn = optim.build_optimizer(cfg, mask, total_steps=total_steps)
    mesh = sharding.make_mesh(mesh_shape, devices or jax.devices()[: int(np.prod(mesh_shape))])
    state = create_train_state(model, tx, mesh, seed=0)
    setup = StepSetup(
        graphdef, tx, mask, lr_fn, mesh, shardings_of(state), sharding.batch_sharding(mesh)
    )
    return state, setup, steps.make_train_step(setup, ClassificationTask(), accumulation)


def run(state, setup, step_fn, n=5):
    losses = []
    for i in range(n):
        batch = sharding.put_batch(toy_batch(seed=i), setup.batch_sharding)
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def test_loss_decreases_and_step_compiles_once():
    state, setup, step_fn = build()
    batch = sharding.put_batch(toy_batch(), setup.batch_sharding)
    first = None
    for _ in range(30):
        state, m = step_fn(state, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.5 * first
    assert int(state.step) == 30
    assert step_fn._cache_size() == 1
    for key in ("grad_norm", "param_norm", "update_norm", "learning_rate", "accuracy"):
        assert np.isfinite(float(m[key]))


def test_gradient_accumulation_equals_full_batch():
    # Without dropout (micro-batches draw different dropout masks than the full batch).
    s1, setup1, f1 = build(accumulation=1, dropout=0.0)
    s4, setup4, f4 = build(accumulation=4, dropout=0.0)
    s1, l1 = run(s1, setup1, f1, n=3)
    s4, l4 = run(s4, setup4, f4, n=3)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s4.params)


def test_data_parallel_8_devices_matches_one_device():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    s1, setup1, f1 = build(mesh_shape=(1, 1, 1))
    s8, setup8, f8 = build(mesh_shape=(-1, 1, 1), devices=jax.devices())
    s1, l1 = run(s1, setup1, f1)
    s8, l8 = run(s8, setup8, f8)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    assert len(s8.params["dense"]["kernel"].sharding.device_set) == 8


def collective_counts(compiled_hlo: str) -> dict[str, int]:
    return {op: c["count"] for op, c in collectives.collective_traffic(compiled_hlo).items()}


def test_accumulation_on_a_data_parallel_mesh_moves_no_rows():
    """Each device's rows split into its own share of every micro-batch: the compiled step
    communicates only to sum gradients and metrics (contiguous micro-batches made XLA all-gather
    the batch: 4 all-gathers here). Same losses as one device without accumulation."""
    s1, setup1, f1 = build(dropout=0.0)
    s8, setup8, f8 = build(mesh_shape=(-1, 1, 1), devices=jax.devices(), accumulation=2,
                           dropout=0.0)  # fmt: skip
    batch = sharding.put_batch(toy_batch(), setup8.batch_sharding)
    ops = collective_counts(f8.lower(s8, batch).compile().as_text())
    assert ops["all-reduce"] >= 1 and ops["all-gather"] == ops["all-to-all"] == 0, ops
    assert ops["collective-permute"] == ops["reduce-scatter"] == 0, ops
    np.testing.assert_allclose(run(s1, setup1, f1)[1], run(s8, setup8, f8)[1], rtol=1e-5)


def test_frozen_params_bit_identical_after_training():
    state, setup, step_fn = build(policy="head_only")
    before = jax.device_get(state.params)
    state, _ = run(state, setup, step_fn, n=10)
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(before["dense"]["kernel"], after["dense"]["kernel"])
    np.testing.assert_array_equal(
        before["embeddings"]["embedding"], after["embeddings"]["embedding"]
    )
    assert not np.array_equal(before["classifier"]["kernel"], after["classifier"]["kernel"])


def test_dropout_rng_is_deterministic_per_step():
    """Same seed -> identical losses; dropout is active (differs from a no-dropout run)."""
    _, la = run(*build())
    _, lb = run(*build())
    _, lc = run(*build(dropout=0.0))
    assert la == lb
    assert la != lc


def set_weight(state, setup, value):
    """``state`` with ``classifier/kernel[0, 0] = value`` (NaN: the next step's loss is NaN)."""
    params = jax.tree.map(np.array, jax.device_get(state.params))
    params["classifier"]["kernel"][0, 0] = value
    return state.replace(params=jax.device_put(params, setup.state_shardings.params))


def test_nonfinite_loss_skips_the_update_and_keeps_the_optimizer_state():
    """A NaN loss: the step advances, parameters and optimizer moments stay bit-identical; only
    the schedule's counters move on."""
    state, setup, step_fn = build()
    state, _ = run(state, setup, step_fn, n=2)  # non-trivial moments
    state = set_weight(state, setup, np.nan)
    before = jax.device_get((state.params, state.opt_state))
    clocks = optimizers.clock_mask(state.opt_state)
    batch = sharding.put_batch(toy_batch(seed=5), setup.batch_sharding)
    state, m = step_fn(state, batch)
    assert float(m["nonfinite"]) == 1.0 and float(m["update_norm"]) == 0.0
    assert not np.isfinite(float(m["loss"])) and int(state.step) == 3
    after = jax.device_get((state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after[0], before[0])
    n_clocks = 0
    for clock, a, b in zip(*(jax.tree.leaves(t) for t in (clocks, after[1], before[1]))):
        n_clocks += clock
        np.testing.assert_array_equal(a, b + 1 if clock else b)
    assert n_clocks == 1  # the count of AdamW's learning-rate schedule


def test_schedule_free_step_count_advances_over_a_skipped_update():
    """Schedule-Free reads its learning-rate schedule at its own step count: a skipped update
    advances it (as it does the base optimizer's schedule) and keeps its average and weights."""
    from optax.contrib import ScheduleFreeState

    state, setup, step_fn = build(name="schedule_free_adamw", warmup_ratio=0.5, total_steps=8)
    state, _ = run(state, setup, step_fn, n=2)
    state = set_weight(state, setup, np.nan)
    before = jax.device_get(state.opt_state)
    state, m = step_fn(state, sharding.put_batch(toy_batch(seed=5), setup.batch_sharding))
    assert float(m["nonfinite"]) == 1.0
    after = jax.device_get(state.opt_state)
    is_sf = lambda x: isinstance(x, ScheduleFreeState)  # noqa: E731
    (sf_before,), (sf_after,) = (
        [x for x in jax.tree.leaves(t, is_leaf=is_sf) if is_sf(x)] for t in (before, after)
    )
    assert int(sf_after.step_count) == int(sf_before.step_count) + 1
    np.testing.assert_array_equal(sf_after.weight_sum, sf_before.weight_sum)
    jax.tree.map(np.testing.assert_array_equal, sf_after.z, sf_before.z)


def test_schedule_stays_with_the_step_after_a_skipped_update():
    """SGD (no momentum, no clipping), linear decay over 4 steps, NaN at step 1: the update of
    step 2 uses the rate of step 2, the one logged, as when the schedule follows the steps."""
    state, setup, step_fn = build(lr=1.0, dropout=0.0, total_steps=4, name="sgd", momentum=0.0,
                                  schedule="linear", grad_clip_norm=0.0)  # fmt: skip
    rates, logged = [], []
    for i in range(4):
        state = set_weight(state, setup, np.nan if i == 1 else 0.1)
        batch = sharding.put_batch(toy_batch(seed=i), setup.batch_sharding)
        state, m = step_fn(state, batch)
        logged.append(float(m["learning_rate"]))
        if float(m["nonfinite"]) == 0.0:
            rates.append(float(m["update_norm"]) / float(m["grad_norm"]))
    np.testing.assert_allclose(logged, [1.0, 0.75, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(rates, [1.0, 0.5, 0.25], rtol=1e-5)


def test_finite_step_updates_the_donated_state():
    """A good step reports nonfinite 0 and consumes (donates) the state it was given."""
    state, setup, step_fn = build()
    batch = sharding.put_batch(toy_batch(), setup.batch_sharding)
    old = state.params["classifier"]["kernel"]
    state, m = step_fn(state, batch)
    assert float(m["nonfinite"]) == 0.0 and float(m["update_norm"]) > 0.0
    assert old.is_deleted()
