"""Dropout: identity without a key, inverted scaling, hashed masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models import dropout


def test_dropout_is_identity_without_rng_and_scales_with_it():
    x = jnp.ones((1000,))
    assert dropout.dropout(x, 0.5, None) is x
    y = dropout.dropout(x, 0.5, jax.random.key(0))
    assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}
    assert 0.4 < float((y == 0).mean()) < 0.6


def test_hashed_dropout_mask_statistics_and_determinism():
    shape = (64, 128, 128)  # 1M elements
    k1, k2 = jax.random.key(1), jax.random.key(2)
    m1 = np.asarray(dropout.hashed_keep_mask(k1, 0.9, shape))
    m2 = np.asarray(dropout.hashed_keep_mask(k2, 0.9, shape))
    assert abs(m1.mean() - 0.9) < 2e-3 and abs(m2.mean() - 0.9) < 2e-3
    np.testing.assert_array_equal(m1, np.asarray(dropout.hashed_keep_mask(k1, 0.9, shape)))
    assert abs((m1 & m2).mean() - 0.81) < 3e-3  # independent across keys
    flat = m1.reshape(-1).astype(float)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5e-3  # neighbours uncorrelated
    x = jnp.ones(shape)
    with dropout.dropout_implementation("hash"):
        y = np.asarray(dropout.dropout(x, 0.1, k1))
    np.testing.assert_allclose(y, np.where(m1, 1 / 0.9, 0.0), rtol=1e-6)
    with pytest.raises(ValueError, match="'philox'"):
        with dropout.dropout_implementation("philox"):
            pass
