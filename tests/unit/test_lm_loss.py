"""Chunked causal-LM loss: the same sums, losses and gradients as the whole-sequence loss."""

import jax
import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])  # T = 7: padded chunks, one chunk, chunk > T
def test_chunked_token_stats_equal_the_whole(chunk):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (2, 7, 5))
    w = jax.random.normal(kw, (5, 11))
    targets = jax.random.randint(kt, (2, 7), 0, 11)

    def total(h, w_, chunked):
        def head(x):
            return x @ w_

        if chunked:
            losses, _ = lm_loss.chunked_token_stats(head, h, targets, chunk)
        else:
            losses, _ = lm_loss.token_stats(head(h), targets)
        return losses.sum()

    whole = lm_loss.token_stats(hidden @ w, targets)
    parts = lm_loss.chunked_token_stats(lambda x: x @ w, hidden, targets, chunk)
    assert parts[0].shape == parts[1].shape == (2, 7)
    np.testing.assert_allclose(parts[0], whole[0], rtol=1e-6)
    np.testing.assert_array_equal(parts[1], whole[1])
    g_whole = jax.grad(total, argnums=(0, 1))(hidden, w, False)
    g_parts = jax.grad(total, argnums=(0, 1))(hidden, w, True)
    for a, b in zip(g_parts, g_whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


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
    from sft_jax import benchmark

    spec = benchmark.get_spec("tiny-llama", "float32", 4)  # 4 rows over data x fsdp
    whole = benchmark.run_jax(spec, warmup=0, steps_=1, mesh_shape=(2, 2, 2))
    with lm_loss.loss_chunk_scope(3):  # T = 8: chunks of 3, 3 and 2 (+1 padding)
        chunked = benchmark.run_jax(spec, warmup=0, steps_=1, mesh_shape=(2, 2, 2))
    assert chunked["compilations"] == 1
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
