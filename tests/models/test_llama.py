"""LlamaForCausalLM: parameters and logical names, packing, padding, KV cache, RoPE, shapes."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sft_jax.models import decoder
from sft_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
)  # fmt: skip


def tiny_llama(seed=0, **overrides):
    """A tiny random Llama; norm scales perturbed so that nothing is trivially symmetric."""
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))
    for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(path).encode()))
        p.set_value(p[...] + 0.3 * jax.random.normal(key, p.shape))
    return model


def logical_names(model):
    """Dotted path -> logical axis names of every Param."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}


def check_only_params(model):
    """Every Variable is an nnx.Param carrying one logical name per axis."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    for path, v in nnx.to_flat_state(params):
        names = v.get_metadata()["out_sharding"]
        assert len(names) == v.ndim, path


def check_packing(model, vocab):
    """A packed row [a a a b b 0] gives each sequence's own logits."""
    rng = np.random.RandomState(0)
    a, b = rng.randint(1, vocab, 3), rng.randint(1, vocab, 2)
    packed = jnp.asarray(np.concatenate([a, b, [0]])[None])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    got = np.asarray(model(packed, segment_ids=seg))
    want_a = np.asarray(model(jnp.asarray(a[None])))[0]
    want_b = np.asarray(model(jnp.asarray(b[None])))[0]
    diff = max(np.abs(got[0, :3] - want_a).max(), np.abs(got[0, 3:5] - want_b).max())
    print(f"packed vs separate: {diff:.2e}")
    assert diff <= 1e-5


def check_cache_matches_full_forward(model, vocab):
    """Prefill a left-padded batch, then decode token by token: same logits as a full pass."""
    rng = np.random.RandomState(1)
    ids = jnp.asarray(rng.randint(1, vocab, (2, 7)))
    mask = jnp.asarray([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    full = np.asarray(model(ids, mask))
    cache = model.init_cache(2, 8)
    step = jax.jit(lambda m, i, k, c: m(i, k, cache=c))
    logits, cache = step(model, ids[:, :4], mask[:, :4], cache)
    pieces = [np.asarray(logits)]
    for t in range(4, 7):
        logits, cache = step(model, ids[:, t : t + 1], mask[:, t : t + 1], cache)
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    real = np.asarray(mask).astype(bool)
    diff = np.abs(got - full)[real].max()
    print(f"cached vs full: {diff:.2e}")
    assert diff <= 1e-5 and int(cache.index) == 7


def check_left_padding_is_invisible(model, vocab):
    """A left-padded row gives the same logits as the unpadded sequence."""
    ids = np.random.RandomState(2).randint(1, vocab, 5)
    padded = jnp.asarray(np.concatenate([[0, 0], ids])[None])
    got = np.asarray(model(padded, jnp.asarray([[0, 0, 1, 1, 1, 1, 1]])))[0, 2:]
    want = np.asarray(model(jnp.asarray(ids[None])))[0]
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_params_and_logical_names(tied):
    model = tiny_llama(tie_word_embeddings=tied, attention_bias=True)
    check_only_params(model)
    names = logical_names(model)
    layer = "model.layers.0"
    assert names["model.embed_tokens.embedding"] == ("vocab", "embed")
    assert names[f"{layer}.self_attn.q_proj.kernel"] == ("embed", "heads")
    assert names[f"{layer}.self_attn.k_proj.kernel"] == ("embed", "kv")
    assert names[f"{layer}.self_attn.v_proj.bias"] == ("kv",)
    assert names[f"{layer}.self_attn.o_proj.kernel"] == ("heads", "embed")
    assert names[f"{layer}.mlp.gate_proj.kernel"] == ("embed", "mlp")
    assert names[f"{layer}.mlp.down_proj.kernel"] == ("mlp", "embed")
    assert names[f"{layer}.input_layernorm.scale"] == ("norm",)
    assert ("lm_head.kernel" in names) == (not tied)


def test_qwen2_biases():
    model = tiny_llama(model_type="qwen2")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


def test_packing_padding_and_cache():
    model = tiny_llama()
    check_packing(model, 50)
    check_left_padding_is_invisible(model, 50)
    check_cache_matches_full_forward(model, 50)


def test_dropout_only_with_rng():
    model = tiny_llama(attention_dropout=0.5)
    ids = jnp.ones((1, 6), jnp.int32)
    np.testing.assert_array_equal(model(ids), model(ids))
    assert not np.allclose(model(ids), model(ids, dropout_rng=jax.random.key(0)))


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ],
)  # fmt: skip
def test_rope_inv_freq_matches_transformers(scaling):
    params = {"rope_type": "default", "rope_theta": 5e5, **(scaling or {})}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=params)
    if scaling is None:
        want = 1.0 / (5e5 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    got = decoder.rope_inv_freq(64, 5e5, scaling)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_unsupported_settings_fail_early():
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        LlamaConfig(**TINY, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(NotImplementedError, match="sliding-window"):
        LlamaConfig.from_hf_dict({**TINY, "model_type": "qwen2", "use_sliding_window": True})


def test_smollm2_shapes_without_allocating():
    abstract = nnx.eval_shape(
        lambda: LlamaForCausalLM(LlamaConfig.smollm2_135m(), rngs=nnx.Rngs(0))
    )
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == 134_515_008
    out = jax.eval_shape(lambda m, x: m(x), abstract, jax.ShapeDtypeStruct((2, 5), jnp.int32))
    assert out.shape == (2, 5, 49152) and out.dtype == jnp.float32


def test_segment_positions_and_cached_mask():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(decoder.segment_positions(seg), [[0, 1, 0, 1, 2, 0]])
    cache = decoder.KVCache.create(1, 2, 5, 1, 2, jnp.float32)
    cache = dataclasses.replace(cache, mask=cache.mask.at[:, :2].set(jnp.asarray([[0, 1], [1, 1]])),
                                index=jnp.asarray(2, jnp.int32))  # fmt: skip
    mask, pos, new_mask = decoder.causal_lm_inputs(2, 1, None, None, None, cache)
    np.testing.assert_array_equal(pos, [[1], [2]])  # continues the count of real tokens
    assert not mask.causal  # the causal offset is in the dense part
    np.testing.assert_array_equal(mask.dense[:, 0, 0], [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(new_mask, [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_bfloat16_compute_stays_close_to_float32():
    f32 = tiny_llama()
    bf16 = LlamaForCausalLM(LlamaConfig(**TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    ids = jnp.asarray([[3, 7, 11, 5]])
    out = bf16(ids)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(f32(ids))).max() < 0.1 * np.abs(f32(ids)).max()
    _, cache = bf16(ids, cache=bf16.init_cache(1, 6))
    assert cache.keys[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("pad", [TINY["vocab_size"], -1])
def test_masked_out_of_range_pad_ids_match_pad_id_zero(pad):
    """Padding ids outside the vocabulary (left or right) leave the real tokens' logits as pad
    id 0 does: a NaN embedding at a masked key would otherwise poison the whole row."""
    model = tiny_llama()
    ids = jnp.asarray([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    real = np.asarray(mask).astype(bool)
    want = np.asarray(model(ids, mask))[real]
    got = np.asarray(model(jnp.where(mask == 1, ids, pad), mask))[real]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6)
