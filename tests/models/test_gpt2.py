"""GPT2LMHeadModel: parameters and logical names, packing, padding, KV cache, shapes."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from tests.models.test_llama import (
    check_cache_matches_full_forward,
    check_left_padding_is_invisible,
    check_only_params,
    check_packing,
    logical_names,
)

TINY = dict(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4)


def tiny_gpt2(seed=0, **overrides):
    """A tiny random GPT-2 (dropout off unless asked) with perturbed LayerNorm parameters."""
    drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, **drop, **overrides}), rngs=nnx.Rngs(seed))
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(path).encode()))
        p.set_value(p[...] + 0.3 * jax.random.normal(key, p.shape))
    return model


def test_params_and_logical_names():
    model = tiny_gpt2()
    check_only_params(model)
    names = logical_names(model)
    block = "transformer.h.1"
    assert names["transformer.wte.embedding"] == ("vocab", "embed")
    assert names["transformer.wpe.embedding"] == (None, "embed")
    assert names[f"{block}.attn.c_attn.kernel"] == ("embed", "heads")
    assert names[f"{block}.attn.c_proj.kernel"] == ("heads", "embed")
    assert names[f"{block}.mlp.c_fc.kernel"] == ("embed", "mlp")
    assert names[f"{block}.mlp.c_proj.kernel"] == ("mlp", "embed")
    assert names[f"{block}.ln_1.scale"] == ("norm",)
    assert not any("lm_head" in k for k in names)  # always tied


def test_packing_padding_and_cache():
    model = tiny_gpt2()
    check_packing(model, 40)
    check_left_padding_is_invisible(model, 40)
    check_cache_matches_full_forward(model, 40)


def test_dropout_only_with_rng():
    model = tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    ids = jnp.ones((1, 6), jnp.int32)
    np.testing.assert_array_equal(model(ids), model(ids))
    assert not np.allclose(model(ids), model(ids, dropout_rng=jax.random.key(0)))


def test_gpt2_small_shapes_without_allocating():
    abstract = nnx.eval_shape(lambda: GPT2LMHeadModel(GPT2Config.gpt2_small(), rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == 124_439_808
    out = jax.eval_shape(lambda m, x: m(x), abstract, jax.ShapeDtypeStruct((1, 4), jnp.int32))
    assert out.shape == (1, 4, 50257)


def test_masked_out_of_range_pad_ids_match_pad_id_zero():
    model = tiny_gpt2()
    ids = jnp.asarray([[5, 6, 7, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 0, 0]])
    want = np.asarray(model(ids, mask))[0, :3]
    for pad in (TINY["vocab_size"], -1):
        got = np.asarray(model(ids.at[0, 3:].set(pad), mask))[0, :3]
        assert np.isfinite(got).all(), pad
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_length_past_n_positions_is_an_error():
    model = tiny_gpt2()
    limit = TINY["n_positions"]
    with pytest.raises(ValueError, match=f"sequence length {limit + 1} exceeds the model's "
                       f"n_positions={limit}"):  # fmt: skip
        model(jnp.ones((1, limit + 1), jnp.int32))
    with pytest.raises(ValueError, match=f"KV cache of {limit + 4} slots exceeds"):
        model(jnp.ones((1, 2), jnp.int32), cache=model.init_cache(1, limit + 4))
    logits, _ = model(jnp.ones((1, 2), jnp.int32), cache=model.init_cache(1, limit))
    assert logits.shape == (1, 2, TINY["vocab_size"])
