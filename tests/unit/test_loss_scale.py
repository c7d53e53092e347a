"""float16 compute with a dynamic loss scale: the scale's rule, and the train step that uses it
(small gradients survive float16; an overflow is skipped and halves the scale)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from sft_jax import loss_scale, optim, optimizers, sharding, steps
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from sft_jax.tasks import CausalLMTask
from sft_jax.train_state import StepSetup, create_train_state, shardings_of
from tests.unit.test_parallel import lm_batch


def test_the_scale_halves_after_an_overflow_and_doubles_after_interval_finite_steps():
    top = loss_scale.dynamic_loss_scale(init_scale=2.0**127, interval=1)
    _, top_state = top.update({"w": jnp.ones(2)}, top.init(None))
    assert float(top_state.scale) == 2.0**127  # 2**128 is float32's infinity: not doubled
    tx = loss_scale.dynamic_loss_scale(init_scale=8.0, interval=3)
    grads = {"w": jnp.ones(2)}
    bad = {"w": jnp.array([1.0, jnp.inf])}
    state = tx.init(grads)
    seen = []
    for g in (grads, grads, bad, grads, grads, grads, grads, bad, bad, bad, bad, bad):
        updates, state = tx.update(g, state)
        assert updates is g  # passed through unchanged
        seen.append((float(state.scale), int(state.good_steps)))
    assert seen == [
        (8.0, 1), (8.0, 2), (4.0, 0), (4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1),
        (4.0, 0), (2.0, 0), (1.0, 0), (1.0, 0), (1.0, 0),  # never below 1
    ]  # fmt: skip


def test_current_finds_the_scale_in_the_optimizer_chain_and_marks_it_a_clock():
    cfg = optim_cfg()
    params = {"w": jnp.ones((2, 2))}
    mask = {"w": True}
    tx, _ = optim.build_optimizer(cfg, mask, 10, loss_scale=True)
    opt_state = tx.init(params)
    assert float(loss_scale.current(opt_state)) == 2.0**16
    clocks = optimizers.clock_mask(opt_state)
    assert jax.tree.leaves(clocks[0]) == [True, True]  # moves on skipped steps too
    plain, _ = optim.build_optimizer(cfg, mask, 10)
    assert loss_scale.current(plain.init(params)) is None


def optim_cfg(**kw):
    return common.optimizer(warmup_ratio=0.0, schedule="constant", **kw)


def tiny_llama(dtype: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, dtype=dtype,
    )  # fmt: skip
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def sgd_step(dtype: str, tx: optax.GradientTransformation, accumulation: int = 1, pmap=False):
    """``(state, step, batch)``: the train step of the tiny Llama computing in ``dtype``
    (float32 parameters), jitted on one device or (``pmap``) mapped over 2."""
    model = tiny_llama(dtype)
    graphdef, params = nnx.split(model, nnx.Param)
    trainable = jax.tree.map(lambda _: True, nnx.to_pure_dict(params))
    mesh = sharding.make_mesh((1, 1, 1))
    state = create_train_state(model, tx, mesh, seed=0)
    setup = StepSetup(
        graphdef, tx, trainable, optax.constant_schedule(1.0), mesh, shardings_of(state),
        sharding.batch_sharding(mesh),
    )  # fmt: skip
    # 16 copies of the [16, 8] batch: each position's share of the mean loss is 1/1008,
    # as in a real batch of about a thousand target tokens.
    batch = {k: np.tile(v, (16, 1)) for k, v in lm_batch(0).items()}
    if pmap:
        devices = jax.devices()[:2]
        step = steps.make_pmap_train_step(setup, CausalLMTask(), accumulation, devices)
        return sharding.replicate(state, devices), step, sharding.pmap_batch(batch, 2)
    batch = sharding.put_batch(batch, setup.batch_sharding)
    return state, steps.make_train_step(setup, CausalLMTask(), accumulation), batch


@functools.cache
def gradients(dtype: str, scaled: bool, accumulation: int = 1, pmap=False) -> list[np.ndarray]:
    """The step's gradients, read back from one SGD update of rate 1 (new = old - grad)."""
    tx = optax.sgd(1.0)
    if scaled:
        tx = optax.chain(loss_scale.dynamic_loss_scale(), tx)
    state, step, batch = sgd_step(dtype, tx, accumulation, pmap)
    one = sharding.unreplicate if pmap else (lambda tree: tree)
    old = jax.device_get(one(state.params))
    state, m = step(state, batch)
    m = one(m)
    assert float(m["nonfinite"]) == 0.0
    assert ("loss_scale" in m) == scaled
    new = jax.device_get(one(state.params))
    return [
        np.float64(a) - np.float64(b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))
    ]


def test_the_loss_scale_keeps_small_float16_gradients_from_underflowing():
    """Without the scale, the per-position gradients on the way back through float16
    activations fall below its smallest numbers (6e-8 subnormal, 6e-5 normal) and are lost:
    the gradients are 5% off the float32 ones (largest error over the parameters, relative to
    the parameter's largest gradient). With it: 0.2%, float16's own rounding."""
    want = gradients("float32", scaled=False)

    def error(got):
        return max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want))

    plain, scaled = error(gradients("float16", False)), error(gradients("float16", True))
    assert plain > 0.02 and scaled < 0.005, (plain, scaled)


@pytest.mark.parametrize("accumulation, pmap", [(2, False), (1, True), (2, True)])
def test_scaled_float16_gradients_under_accumulation_and_pmap(accumulation, pmap):
    """Micro-batches and pmap's per-device halves each scale their share of the loss; the
    summed gradients are unscaled once: the same gradients as one jitted float16 step, within
    float16's rounding of differently split sums."""
    want = gradients("float16", True)
    got = gradients("float16", True, accumulation, pmap)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-3 * np.max(np.abs(w)))


def test_an_overflowing_float16_step_is_skipped_and_halves_the_scale():
    """Started at 2**40 the scaled float16 gradients overflow: those steps keep the parameters,
    report a finite loss and ``nonfinite`` 1, and halve the scale, until it fits; then the
    update applies."""
    tx = optax.chain(loss_scale.dynamic_loss_scale(init_scale=2.0**40), optax.sgd(0.1))
    state, step, batch = sgd_step("float16", tx)
    history = []
    for _ in range(40):
        old = jax.device_get(state.params)
        state, m = step(state, batch)
        changed = any(
            np.any(a != b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(state.params))
        )
        history.append((float(m["loss_scale"]), float(m["nonfinite"]), changed))
        assert np.isfinite(float(m["loss"]))
        if not m["nonfinite"]:
            break
    scales = [h[0] for h in history]
    assert len(history) > 1 and scales == [2.0**40 / 2**i for i in range(len(history))]
    assert all(h[1:] == (1.0, False) for h in history[:-1])  # skipped, parameters kept
    assert history[-1][1:] == (0.0, True)  # the first scale that fits: applied
    assert float(loss_scale.current(state.opt_state)) == scales[-1]


@pytest.mark.parametrize("bad", ["float8", "int8"])
def test_unknown_compute_dtype_names_the_key(bad):
    from configs import text_cls
    from sft_jax import components

    cfg = text_cls.get_config("debug")
    cfg.model.dtype = bad
    with pytest.raises(ValueError, match=r"model.dtype='%s'" % bad):
        components.compute_dtype(cfg)
