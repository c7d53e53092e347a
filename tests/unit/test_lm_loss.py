"""Chunked causal-LM loss (fused linear cross-entropy): the same sums and gradients as the
whole-sequence loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sft_jax import lm_loss, tasks
from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM


def test_token_stats_exact_values():
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    losses, hits = lm_loss.token_stats(logits, jnp.asarray([[1, 2]]))
    np.testing.assert_allclose(losses, [[-np.log(0.25), -np.log(0.7)]], rtol=1e-6)
    np.testing.assert_array_equal(hits, [[0.0, 1.0]])


def _reference_loss(logits, targets, w):
    """Autodiff's float32 cross-entropy (optax), the function ``cross_entropy`` must equal."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * w)


def _loss(logits, targets, w):
    return jnp.sum(lm_loss.cross_entropy(logits, targets) * w)


def test_cross_entropy_and_its_gradient_equal_autodiff_in_float32():
    kl, kt, kw = jax.random.split(jax.random.key(0), 3)
    logits = 3 * jax.random.normal(kl, (2, 5, 11))
    targets = jax.random.randint(kt, (2, 5), 0, 11)
    w = jax.random.uniform(kw, (2, 5))
    np.testing.assert_allclose(
        lm_loss.cross_entropy(logits, targets),
        optax.softmax_cross_entropy_with_integer_labels(logits, targets),
        rtol=1e-6,
    )
    grad = jax.grad(_loss)(logits, targets, w)
    np.testing.assert_allclose(grad, jax.grad(_reference_loss)(logits, targets, w), atol=1e-7)
    # by hand: w * (softmax - onehot)
    by_hand = w[..., None] * (jax.nn.softmax(logits) - jax.nn.one_hot(targets, 11))
    np.testing.assert_allclose(grad, by_hand, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32])
def test_cross_entropy_negative_and_narrow_targets_agree_with_autodiff(dtype):
    """Negative targets count from the end (as indexing does) in the loss and its gradient
    alike; int8 targets over a 300-word vocabulary get the right one-hot."""
    logits = jax.random.normal(jax.random.key(2), (2, 3, 300))
    targets = jnp.asarray([[-1, 0, 5], [127, -3, 299 if dtype == jnp.int32 else 100]], dtype)
    w = jnp.ones((2, 3))
    np.testing.assert_allclose(_loss(logits, targets, w), _reference_loss(logits, targets, w))
    np.testing.assert_allclose(
        jax.grad(_loss)(logits, targets, w),
        jax.grad(_reference_loss)(logits, targets, w),
        atol=1e-7,
    )


def test_cross_entropy_gradient_comes_back_in_bfloat16_without_a_scatter():
    """bfloat16 logits: the float32 gradient rounded once to bfloat16, and no scatter of the
    one-hot in the backward pass (autodiff's take_along_axis transpose)."""
    kl, kt, kw = jax.random.split(jax.random.key(1), 3)
    logits = (3 * jax.random.normal(kl, (2, 5, 11))).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (2, 5), 0, 11)
    w = jax.random.uniform(kw, (2, 5))
    grad = jax.grad(_loss)(logits, targets, w)
    assert grad.dtype == jnp.bfloat16
    ref = jax.grad(_reference_loss)(logits, targets, w)  # bf16 too: f32 math, rounded once
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(ref, np.float32), rtol=2**-7, atol=1e-6
    )
    assert "scatter" in str(jax.make_jaxpr(jax.grad(_reference_loss))(logits, targets, w))
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(_loss))(logits, targets, w))


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])  # T = 7: padded chunks, one chunk, chunk > T
def test_chunked_loss_sums_equal_the_whole_with_gradients(chunk):
    kh, kw, kb, kt, km = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(kh, (2, 7, 5))
    params = {"w": jax.random.normal(kw, (5, 11)), "b": jax.random.normal(kb, (11,))}
    targets = jax.random.randint(kt, (2, 7), 0, 11)
    weights = jax.random.bernoulli(km, 0.6, (2, 7)).astype(jnp.float32)

    def head(p, x):
        return x @ p["w"] + p["b"]

    def whole(p, h, w):
        losses, hits = lm_loss.token_stats(head(p, h), targets)
        return jnp.sum(losses * w), jnp.sum(hits * w)

    def parts(p, h, w):
        return lm_loss.chunked_loss_sums(head, p, h, targets, w, chunk)

    np.testing.assert_allclose(parts(params, hidden, weights), whole(params, hidden, weights),
                               rtol=1e-6)  # fmt: skip
    # Any cotangents of (loss_sum, correct): the correct count has none but through the weights.
    for fn_a, fn_b in ((parts, whole), (jax.jit(parts), whole)):
        _, vjp_a = jax.vjp(fn_a, params, hidden, weights)
        _, vjp_b = jax.vjp(fn_b, params, hidden, weights)
        cot = (jnp.float32(0.7), jnp.float32(-1.3))
        for a, b in zip(jax.tree.leaves(vjp_a(cot)), jax.tree.leaves(vjp_b(cot))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_gradient_exact_values():
    """One position, two classes: d loss / d logits = softmax - onehot, by hand."""
    params = {"w": jnp.eye(2)}
    hidden = jnp.log(jnp.asarray([[[0.25, 0.75]]]))  # logits = hidden: softmax (0.25, 0.75)
    targets, weights = jnp.asarray([[0]]), jnp.asarray([[2.0]])

    def loss(p, h):
        return lm_loss.chunked_loss_sums(lambda q, x: x @ q["w"], p, h, targets, weights, 1)[0]

    value, (g_p, g_h) = jax.value_and_grad(loss, argnums=(0, 1))(params, hidden)
    np.testing.assert_allclose(value, -2.0 * np.log(0.25), rtol=1e-6)
    np.testing.assert_allclose(g_h, [[[2.0 * (0.25 - 1.0), 2.0 * 0.75]]], rtol=1e-6)
    np.testing.assert_allclose(g_p["w"], np.outer(np.asarray(hidden[0, 0]), [-1.5, 1.5]),
                               rtol=1e-6)  # fmt: skip


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="runtime.loss_chunk=-1"):
        lm_loss.set_loss_chunk(-1)


def _tiny(kind):
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=32, tie_word_embeddings=False)  # fmt: skip
        return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_task_loss_and_gradients_are_the_same_in_chunks(kind):
    model = _tiny(kind)
    rng = np.random.default_rng(0)
    seg = np.ones((2, 10), np.int32)
    seg[1, 6:] = 2  # two packed segments in row 1
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, 64, (2, 10)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 64, (2, 10)), jnp.int32),
        "target_mask": jnp.asarray(rng.integers(0, 2, (2, 10)), jnp.int32),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(np.where(seg == 1, np.arange(10), np.arange(10) - 6)),
    }
    task = tasks.get_task("causal_lm")
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, chunk):
        with lm_loss.loss_chunk_scope(chunk):
            total, stats = task.loss_sums(nnx.merge(graphdef, p), batch, jax.random.key(1))
        return total, stats

    (l0, s0), g0 = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (l1, s1), g1 = jax.value_and_grad(loss, has_aux=True)(params, 4)  # 10 = 4 + 4 + 2 (padded)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for key in ("weight", "correct"):
        assert float(s1[key]) == float(s0[key])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with lm_loss.loss_chunk_scope(3):
        evaluated = task.eval_outputs(nnx.merge(graphdef, params), batch)
    np.testing.assert_allclose(evaluated["loss_sum"], task.eval_outputs(model, batch)["loss_sum"],
                               rtol=1e-6)  # fmt: skip


def test_chunked_loss_trains_the_same_on_a_data_fsdp_tensor_mesh():
    """Three steps of the tiny Llama on a 2 x 2 x 2 mesh (vocab-sharded head): the same loss."""
    from sft_jax import benchmark, benchmark_shapes

    spec = benchmark_shapes.get_spec("tiny-llama", "float32", 4)  # 4 rows over data x fsdp
    whole = benchmark.run_jax(spec, warmup=0, steps_=1, mesh_shape=(2, 2, 2))
    with lm_loss.loss_chunk_scope(3):  # T = 8: chunks of 3, 3 and 2 (+1 padding)
        chunked = benchmark.run_jax(spec, warmup=0, steps_=1, mesh_shape=(2, 2, 2))
    assert chunked["compilations"] == 1
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
