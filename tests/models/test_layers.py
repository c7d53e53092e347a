"""Shared layers: LayerNorm, logical axis names, activations, embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models import attention, layers


def test_layer_norm_matches_numpy():
    ln = layers.LayerNorm(8, epsilon=1e-6)
    x = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln(jnp.asarray(x)), want, atol=1e-5)


def test_params_carry_logical_names():
    attn = attention.SelfAttention(12, 3, num_kv_heads=1, rngs=nnx.Rngs(0))
    specs = {
        ".".join(map(str, p)): v.get_metadata()["out_sharding"]
        for p, v in nnx.to_flat_state(nnx.state(attn, nnx.Param))
    }
    assert specs["query.kernel"] == ("embed", "heads")
    assert specs["out.kernel"] == ("heads", "embed")
    assert specs["out.bias"] == ("embed",)
    assert attn.key.kernel.shape == (12, 4)  # one kv head of head_dim 4
    y = attn(jnp.ones((2, 5, 12)), attention.make_attention_mask(5, causal=True))
    assert y.shape == (2, 5, 12)


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="unsupported activation 'nope'"):
        layers.get_activation("nope")


def test_gelu_is_the_erf_form_of_jax_and_torch():
    x = jnp.linspace(-8.0, 8.0, 2001, dtype=jnp.float32)
    ours = layers.get_activation("gelu")(x)
    assert np.abs(ours - jax.nn.gelu(x, approximate=False)).max() <= 2e-6
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 2e-6


def test_embed_clips_out_of_range_ids_instead_of_nan():
    """A padding id outside the table (e.g. == vocab size) must not produce NaN rows."""
    emb = layers.Embed(5, 3, rngs=nnx.Rngs(0))
    table = np.asarray(emb.embedding[...])
    got = np.asarray(emb(jnp.asarray([[0, 4, 5, 99, -1]])))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0], table[[0, 4, 4, 4, 0]])
