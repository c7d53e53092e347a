"""BERT modules: calling contract, dropout, padding, state structure, full-size shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel

TINY = BertConfig(
    vocab_size=41, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
    intermediate_size=20, max_position_embeddings=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return BertForSequenceClassification(TINY, 3, rngs=nnx.Rngs(0))


def _batch(b=2, t=6):
    ids = np.random.RandomState(0).randint(1, TINY.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, t - 2 :] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def test_calling_contract(model):
    ids, mask = _batch()
    logits = model(ids)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert model.num_labels == 3 and model.config is TINY
    same = model(ids, jnp.ones_like(ids), jnp.zeros_like(ids))
    np.testing.assert_array_equal(logits, same)  # None means ones / zeros
    seq, pooled = model.bert(ids, mask)
    assert seq.shape == (2, 6, 12) and pooled.shape == (2, 12)


def test_dropout_only_with_rng_and_deterministic(model):
    ids, mask = _batch()
    base = model(ids, mask)
    np.testing.assert_array_equal(base, model(ids, mask))
    a = model(ids, mask, dropout_rng=jax.random.key(1))
    b = model(ids, mask, dropout_rng=jax.random.key(1))
    c = model(ids, mask, dropout_rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, base) and not np.allclose(a, c)


def test_padding_does_not_change_logits(model):
    ids, mask = _batch(b=1, t=5)
    padded = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], axis=1)
    pmask = jnp.concatenate([mask * 0 + 1, jnp.zeros((1, 3), jnp.int32)], axis=1)
    np.testing.assert_allclose(model(ids), model(padded, pmask), atol=1e-6)


def test_state_is_only_params_and_config_is_static(model):
    graphdef, state = nnx.split(model)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.leaves(state) and len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))
    hash(graphdef)  # static parts (config, num_labels) must be hashable for jit
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "bert.encoder.layer.1.attention.self.query.kernel" in paths
    assert "classifier.kernel" in paths and not any("config" in p for p in paths)
    for _, v in nnx.to_flat_state(params):
        assert len(v.get_metadata()["out_sharding"]) == v.ndim


def test_jit_through_split_merge(model):
    ids, mask = _batch()
    graphdef, params = nnx.split(model)

    @jax.jit
    def f(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    np.testing.assert_allclose(f(params, ids, mask), model(ids, mask), atol=1e-6)


def test_bert_base_param_count_with_eval_shape():
    def count(m):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    base = nnx.eval_shape(lambda: BertModel(BertConfig.bert_base(), rngs=nnx.Rngs(0)))
    assert count(base) == 109_482_240  # bert-base-uncased incl. pooler
    clf = nnx.eval_shape(
        lambda: BertForSequenceClassification(BertConfig.bert_base(), 2, rngs=nnx.Rngs(0))
    )
    assert count(clf) == 109_482_240 + 768 * 2 + 2
    mini = nnx.eval_shape(lambda: BertModel(BertConfig.minilm_l6(), rngs=nnx.Rngs(0)))
    assert count(mini) == 22_713_216  # all-MiniLM-L6-v2


def test_config_hf_dict_round_trip_and_dtypes():
    cfg = BertConfig.minilm_l6(dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    d = cfg.to_hf_dict()
    assert d["model_type"] == "bert" and "dtype" not in d
    assert BertConfig.from_hf_dict({**d, "architectures": ["BertModel"]}) == dataclasses.replace(
        cfg, dtype="float32"
    )
    with pytest.raises(ValueError, match="unsupported activation"):
        BertConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="not divisible"):
        BertConfig(hidden_size=10, num_attention_heads=3)


def test_bfloat16_compute_returns_float32_logits():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    m = BertForSequenceClassification(cfg, 2, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    assert m(ids, mask).dtype == jnp.float32
    assert m.bert.embeddings.word_embeddings.embedding.dtype == jnp.float32


def test_masked_out_of_range_pad_ids_match_pad_id_zero(model):
    """Right padding whose ids are outside the vocabulary is as invisible as pad id 0."""
    ids, mask = _batch()  # row 0 has 2 masked positions at the end
    want = np.asarray(model(ids.at[0, 4:].set(0), mask))
    for pad in (TINY.vocab_size, 10**6, -1):
        got = np.asarray(model(ids.at[0, 4:].set(pad), mask))
        assert np.isfinite(got).all(), pad
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_sequence_longer_than_the_position_table_is_an_error(model):
    limit = TINY.max_position_embeddings
    model(jnp.ones((1, limit), jnp.int32))  # exactly the table size is fine
    with pytest.raises(ValueError, match=f"sequence length {limit + 1} exceeds "
                       f"max_position_embeddings={limit}"):  # fmt: skip
        model(jnp.ones((1, limit + 1), jnp.int32))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):  # at trace time
        forward(state, jnp.ones((1, 2 * limit), jnp.int32))
