"""Attention: masks, MHA and GQA, the XLA and cuDNN paths (GPU-only checks), the head-scores VJP."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sft_jax.models import attention, cudnn_attention


def test_make_attention_mask_parts():
    pad = jnp.array([[1, 1, 0]])
    m = attention.make_attention_mask(3, padding_mask=pad)
    assert m.shape == (1, 1, 1, 3) and m.dtype == jnp.bool_
    causal = attention.make_attention_mask(3, causal=True)
    np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((3, 3), bool)))
    seg = attention.make_attention_mask(4, segment_ids=jnp.array([[1, 1, 2, 2]]), causal=True)
    want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(seg[0, 0], want)
    # Decoding: 1 query over 4 cached keys sees all of them.
    assert bool(attention.make_attention_mask(1, 4, causal=True).all())
    assert attention.make_attention_mask(3) is None


def test_attention_mask_materializes_causal_and_dense_parts():
    seg = jnp.array([[1, 1, 2, 2]])
    dense = attention.make_attention_mask(4, segment_ids=seg)
    got = attention.AttentionMask(dense, causal=True).materialize(4, 4)
    np.testing.assert_array_equal(
        got, attention.make_attention_mask(4, segment_ids=seg, causal=True)
    )
    causal = attention.AttentionMask(causal=True).materialize(3, 3)
    np.testing.assert_array_equal(causal, attention.make_attention_mask(3, causal=True))
    assert attention.AttentionMask(dense).materialize(4, 4) is dense
    assert attention.AttentionMask().materialize(4, 4) is None
    with pytest.raises(ValueError, match="T == S, got T=1, S=4"):
        attention.AttentionMask(causal=True).materialize(1, 4)
    # A pytree with a static causal flag: it crosses jit and checkpoint boundaries.
    parts = attention.AttentionMask(dense, causal=True)
    (leaf,) = jax.tree.leaves(parts)
    assert leaf is dense
    through = jax.jit(jax.checkpoint(lambda m: m.materialize(4, 4)))(parts)
    np.testing.assert_array_equal(through, got)


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_attention_with_an_attention_mask_equals_its_dense_mask(kv_heads):
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 5, 6, 4))
    k = jax.random.normal(kk, (2, 5, kv_heads, 4))
    v = jax.random.normal(kv, (2, 5, kv_heads, 4))
    parts = attention.AttentionMask(attention.make_attention_mask(5, padding_mask=jnp.array(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])), causal=True)  # fmt: skip
    want = attention.dot_product_attention(q, k, v, parts.materialize(5, 5))
    np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, parts), want)


def test_gqa_equals_mha_with_repeated_kv_heads():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 6, 4))  # [B, T, N=6, D]
    k = jax.random.normal(kk, (2, 5, 2, 4))  # K=2 heads, groups of 3
    v = jax.random.normal(kv, (2, 5, 2, 4))
    mask = attention.make_attention_mask(5, padding_mask=jnp.array([[1, 1, 1, 0, 0]] * 2))
    got = attention.dot_product_attention(q, k, v, mask)
    want = attention.dot_product_attention(q, jnp.repeat(k, 3, 2), jnp.repeat(v, 3, 2), mask)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Masked keys get no weight: changing them changes nothing.
    v2 = v.at[:, 3:].set(100.0)
    np.testing.assert_allclose(attention.dot_product_attention(q, k, v2, mask), got, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_float16_attention_scores_do_not_overflow_before_scaling(kv_heads):
    """q.k of 64-dim heads with entries of 40 is 102,400, past float16's 65,504 (inf - inf in
    the softmax: NaN); scaled by 1/8 it is 12,800. float16 attention scales q first, so it gives
    float32's output: every visible key weighs the same."""
    q = jnp.full((1, 3, 4, 64), 40.0)
    k = jnp.full((1, 3, kv_heads, 64), 40.0)
    v = jax.random.normal(jax.random.key(2), (1, 3, kv_heads, 64))
    mask = attention.make_attention_mask(3, causal=True)
    want = attention.dot_product_attention(q, k, v, mask)
    got = attention.dot_product_attention(*(x.astype(jnp.float16) for x in (q, k, v)), mask)
    assert got.dtype == jnp.float16 and bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(np.float32(got), want, atol=2e-2)


def test_attention_implementation_selects_and_falls_back():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32) for _ in range(3))
    ref = attention.dot_product_attention(q, k, v)
    # "cudnn" only applies to bfloat16/float16 compute: float32 keeps the XLA path here (CPU).
    with attention.attention_implementation("cudnn"):
        assert not attention._fused_attention_applies(q, 0.0, None)
        assert attention._fused_attention_applies(q.astype(jnp.bfloat16), 0.0, None)
        assert not attention._fused_attention_applies(
            q.astype(jnp.bfloat16), 0.1, jax.random.key(0)
        )
        np.testing.assert_array_equal(attention.dot_product_attention(q, k, v), ref)
    assert not attention._fused_attention_applies(q.astype(jnp.bfloat16), 0.0, None)  # reset


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks a machine without cuDNN")
@pytest.mark.parametrize("impl", ["cudnn", "cudnn_packed"])
def test_cudnn_attention_without_cudnn_falls_back_with_a_warning(caplog, impl):
    """A GPU config run on CPU (bfloat16 compute, runtime.attention='cudnn'): jax raises
    "cuDNN is not detected"; the layer warns once and computes the XLA attention (packed
    segments too)."""
    from sft_jax.models.decoder import causal_lm_inputs

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 8)), jnp.bfloat16) for _ in range(3))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    mask, _, _ = causal_lm_inputs(2, 8, segment_ids=seg)
    ref = attention.dot_product_attention(q, k, v, mask)
    cudnn_attention._warned.clear()
    with caplog.at_level(logging.WARNING, logger=cudnn_attention.__name__):
        with attention.attention_implementation(impl):
            for _ in range(2):
                out = attention.dot_product_attention(q, k, v, mask)
                np.testing.assert_array_equal(out, ref)
    warnings = [r.getMessage() for r in caplog.records if r.name == cudnn_attention.__name__]
    assert len(warnings) == 1 and "runtime.attention='cudnn' unavailable" in warnings[0]
    with pytest.raises(ValueError, match="'flash'"):
        with attention.attention_implementation("flash"):
            pass


def test_segment_spans_describe_each_rows_segments():
    """cuDNN's packed layout: per row, the length and start of segments 1..M (-1 past the last
    segment, and in the extra offset column); padding (0) belongs to none."""
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0] * 8])
    lengths, offsets = cudnn_attention.segment_spans(seg, 4)
    np.testing.assert_array_equal(lengths, [[2, 3, 1, -1], [8, -1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(
        offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1], [-1, -1, -1, -1, -1]]
    )
    assert lengths.dtype == offsets.dtype == jnp.int32


def test_causal_lm_mask_carries_segments_only_when_they_alone_make_it():
    from sft_jax.models.decoder import causal_lm_inputs

    seg = jnp.asarray([[1, 1, 2, 0]])
    mask, _, _ = causal_lm_inputs(1, 4, segment_ids=seg)
    np.testing.assert_array_equal(mask.segment_ids, seg)
    mask, _, _ = causal_lm_inputs(1, 4, attention_mask=jnp.asarray([[1, 1, 1, 0]]), segment_ids=seg)
    assert mask.segment_ids is None and mask.dense is not None


def _answer_cudnn_checks(monkeypatch):
    """Without a GPU: jax's cuDNN version and device checks answered, so its wrapper traces."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)


@pytest.mark.parametrize("kv, m", [(8, 16), (2, 16), (8, 1), (2, 1)])
def test_cudnn_packed_layout_traces_through_jaxs_wrapper(monkeypatch, kv, m):
    """The segment-lengths attention traces forward and backward through jax's cuDNN wrapper
    (its argument and shape checks), both branches of the cond: segments (M > 1: the packed
    layout, softmax statistics for B x M segments; M = 1: sequence lengths, cuDNN's padding
    mask type) and dense. Grouped-query heads take the dense mask alone on a jax whose packed
    layout strides the keys by the query heads (jax 0.10); sequence lengths take them."""
    from sft_jax.models.decoder import causal_lm_inputs

    _answer_cudnn_checks(monkeypatch)
    b, t, n, d = 2, 256, 8, 64
    seg = np.ones((b, t), np.int32)
    seg[:, 100:], seg[1, 200:] = 2, 0
    mask, _, _ = causal_lm_inputs(b, t, segment_ids=jnp.asarray(seg))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for h in (n, kv, kv))

    def f(q, k, v):
        return attention.dot_product_attention(q, k, v, mask).astype(jnp.float32).sum()

    with attention.attention_implementation("cudnn_packed"):
        with cudnn_attention.MAX_SEGMENTS.scope(m):
            text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v))
    segments = m == 1 or kv == n or cudnn_attention._kv_offsets_use_kv_heads()
    assert ("cond[" in text) == segments
    assert text.count("dot_product_attention_fwd_wrapper[") == 1 + segments
    assert text.count("dot_product_attention_bwd_wrapper[") == 1 + segments
    assert ("PADDING_CAUSAL" in text) == (m == 1)
    if m > 1:
        assert (f"f32[{b * m},{n},{t}]" in text) == segments  # the packed softmax statistics


def test_bert_padding_goes_to_cudnn_as_sequence_lengths(monkeypatch):
    """BERT's padding mask rides along as one segment per row: with cudnn_packed and M = 1
    the encoder's attention traces cuDNN's (non-causal) padding mask type."""
    from sft_jax.models.bert import BertConfig, BertModel

    _answer_cudnn_checks(monkeypatch)
    cfg = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, dtype="bfloat16",
    )  # fmt: skip
    model = BertModel(cfg, rngs=nnx.Rngs(0))
    ids, pad = jnp.ones((2, 8), jnp.int32), jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
    with attention.attention_implementation("cudnn_packed"):
        with cudnn_attention.MAX_SEGMENTS.scope(1):
            text = str(jax.make_jaxpr(lambda i, p: model(i, p)[0])(ids, pad))
    assert "cond[" in text and "mask_type=MaskType.PADDING" in text
    assert "PADDING_CAUSAL" not in text


@pytest.mark.parametrize(
    "rows, m, want",
    [
        ([[1, 1, 1, 0], [1, 1, 1, 1]], 1, True),  # padded rows
        ([[0, 1, 1, 0]], 1, False),  # the sequence starts after token 0
        ([[1, 1, 2, 0]], 1, False),  # two sequences in a row
        ([[1, 1, 2, 0]], 2, True),
        ([[0, 1, 1, 2]], 2, True),  # packed offsets may start anywhere
        ([[1, 2, 1, 0]], 2, False),  # segment 1 in two runs
        ([[1, 2, 3, 0]], 2, False),  # more segments than described
        ([[0, 0, 0, 0]], 1, True),  # an empty row (evaluation filler)
    ],
)
def test_segment_lengths_describe_rows_or_send_the_batch_to_the_dense_mask(rows, m, want):
    seg = jnp.asarray(rows)
    assert bool(cudnn_attention.described(seg, *cudnn_attention.segment_spans(seg, m))) == want


def test_packed_max_segments_is_checked():
    for bad in (0, -1, True, "4", 2.0):
        with pytest.raises(ValueError, match="runtime.packed_max_segments"):
            cudnn_attention.MAX_SEGMENTS.set(bad)
    assert cudnn_attention.MAX_SEGMENTS.get() == cudnn_attention.PACKED_MAX_SEGMENTS


def test_packed_layout_needs_contiguous_segments():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 2, 2, 1, 0, 0, 0]])
    lengths, offsets = cudnn_attention.segment_spans(seg, 4)
    assert bool(cudnn_attention._contiguous(seg[:1], lengths[:1], offsets[:1]))
    assert not bool(cudnn_attention._contiguous(seg[1:], lengths[1:], offsets[1:]))


def test_cudnn_call_asks_for_no_mask_gradient(monkeypatch):
    """While our cuDNN call traces, jax's wrapper is told not to export the bias (mask)
    gradient, and its own answer is back afterwards, also when the call raises."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if not hasattr(fused, "should_export_dbias"):
        pytest.skip("jax >= 0.11 skips a boolean mask's gradient itself")
    original = fused.should_export_dbias
    seen = []

    def fake_attention(q, k, v, *, mask, is_causal, implementation, **seq_lengths):
        seen.append(fused.should_export_dbias(mask.shape, q.shape, "BTNH"))
        if len(seen) == 2:
            raise NotImplementedError("shape refused")
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_attention)
    q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
    mask = attention.AttentionMask(jnp.ones((1, 1, 8, 8), bool), causal=True)
    with attention.attention_implementation("cudnn"):
        out = attention.dot_product_attention(q, q, q, mask)
        assert out is q
        assert fused.should_export_dbias is original
        attention.dot_product_attention(q, q, q, mask)  # refused: the XLA path
    assert seen == [False, False]
    assert fused.should_export_dbias is original and original((1,), (1,), "BTNH") is True


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs an NVIDIA GPU")
@pytest.mark.parametrize("packed", [True, False])
def test_cudnn_attention_matches_xla_in_bfloat16(packed):
    """Causal (cuDNN's causal mask type) + packed segments + padding, or causal alone, GQA:
    outputs and gradients agree to bf16 rounding."""
    from sft_jax.models.decoder import causal_lm_inputs

    b, t, n, kv, d = 2, 256, 8, 2, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for h in (n, kv, kv))
    seg = np.ones((b, t), np.int32)
    if packed:
        seg[:, 100:], seg[1, 200:] = 2, 0
    mask, _, _ = causal_lm_inputs(b, t, segment_ids=jnp.asarray(seg) if packed else None)
    assert mask.causal and (mask.dense is None) == (not packed)
    real = jnp.asarray(seg != 0)[:, :, None, None]

    def f(q, k, v):
        out = attention.dot_product_attention(q, k, v, mask).astype(jnp.float32) * real
        return (out * jnp.linspace(-1, 1, d)).sum(), out

    results = {}
    for impl in ("xla", "cudnn", "cudnn_packed"):
        with attention.attention_implementation(impl):
            fn = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))
            text = fn.lower(q, k, v).compile().as_text()  # the fused kernel: __cudnn$fmha...
            assert ("__cudnn$fmha" in text) == (impl != "xla")
            # No gradient of the mask: the backward call returns dq, dk, dv (and a workspace)
            # but no [B, 1, T, S] bias gradient (_mask_without_gradient).
            results_of_backward = [
                line.split("custom-call(")[0]
                for line in text.splitlines()
                if "SoftmaxBackward" in line and "custom-call(" in line
            ]
            assert bool(results_of_backward) == (impl != "xla")
            assert not any(f"[{b},1,{t},{t}]" in r for r in results_of_backward)
            results[impl] = jax.tree.leaves(fn(q, k, v))
    for impl in ("cudnn", "cudnn_packed"):
        for a, r in zip(results[impl], results["xla"]):
            a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
            assert np.abs(a - r).max() <= 0.01 * np.abs(r).max(), impl


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs an NVIDIA GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [1, 16])
def test_cudnn_padded_rows_as_sequence_lengths_match_xla(causal, m):
    """Padded rows (one sequence per row from token 0; a decoder's segment ids, or an encoder's
    padding mask) as cuDNN sequence lengths (M = 1) or a one-segment packed layout (M = 16):
    real tokens' outputs and gradients equal the XLA path's to bf16 rounding."""
    from sft_jax.models.decoder import causal_lm_inputs

    b, t, n, kv, d = 3, 256, 8, 2, 64
    seg = np.ones((b, t), np.int32)
    seg[1, 180:], seg[2] = 0, 0  # a padded row, and an empty one (evaluation's filler rows)
    if causal:
        mask, _, _ = causal_lm_inputs(b, t, segment_ids=jnp.asarray(seg))
    else:  # as BertModel builds it
        dense = attention.make_attention_mask(t, padding_mask=jnp.asarray(seg))
        mask = attention.AttentionMask(dense, segment_ids=jnp.asarray(seg))
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for h in (n, kv, kv))
    real = jnp.asarray(seg != 0)[:, :, None, None]

    def f(q, k, v):
        out = attention.dot_product_attention(q, k, v, mask).astype(jnp.float32) * real
        return (out * jnp.linspace(-1, 1, d)).sum(), out

    results = {}
    for impl in ("xla", "cudnn_packed"):
        with attention.attention_implementation(impl):
            with cudnn_attention.MAX_SEGMENTS.scope(m):
                fn = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))
                results[impl] = jax.tree.leaves(fn(q, k, v))
    for a, r in zip(results["cudnn_packed"], results["xla"]):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(a).all() and np.abs(a - r).max() <= 0.01 * np.abs(r).max()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs an NVIDIA GPU")
def test_cudnn_packed_rows_with_more_segments_than_the_layout_takes_use_the_dense_mask():
    """A row of 20 segments (more than PACKED_MAX_SEGMENTS) next to a row of 3: the batch takes
    the dense-mask branch and still equals the XLA path."""
    from sft_jax.models.decoder import causal_lm_inputs

    b, t, n, d = 2, 256, 4, 64
    seg = np.zeros((b, t), np.int32)
    seg[0] = np.repeat(np.arange(1, 21), 13)[:t]  # 20 segments
    seg[1, :100], seg[1, 100:180], seg[1, 180:250] = 1, 2, 3
    assert seg[0].max() > cudnn_attention.PACKED_MAX_SEGMENTS
    mask, _, _ = causal_lm_inputs(b, t, segment_ids=jnp.asarray(seg))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16) for _ in range(3))
    real = jnp.asarray(seg != 0)[:, :, None, None]
    outs = {}
    for impl in ("xla", "cudnn_packed"):
        with attention.attention_implementation(impl):
            out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask))(q, k, v)
        outs[impl] = np.asarray(out.astype(jnp.float32) * real)
    assert np.abs(outs["cudnn_packed"] - outs["xla"]).max() <= 0.01 * np.abs(outs["xla"]).max()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs an NVIDIA GPU")
def test_cudnn_left_padded_prefill_keeps_padding_rows_finite():
    """A left-padded prompt's padding queries see no key (the cache's dense mask): cuDNN must not
    make them NaN, or the cached values of later layers carry NaN into decoding (0 * NaN)."""
    from sft_jax.models.decoder import KVCache, causal_lm_inputs

    b, t, n, d = 2, 64, 4, 64
    real = np.ones((b, t), np.int32)
    real[1, :40] = 0  # row 1 left-padded
    cache = KVCache.create(1, b, t, n, d, jnp.bfloat16)
    mask, _, _ = causal_lm_inputs(b, t, attention_mask=jnp.asarray(real), cache=cache)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16) for _ in range(3))
    with attention.attention_implementation("cudnn"):
        out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask))(q, k, v)
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_masked_keys_get_no_attention_weight():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32) for _ in range(3))
    keep = jnp.asarray([[1, 1, 0, 1]])
    mask = attention.make_attention_mask(4, padding_mask=keep)
    out = attention.dot_product_attention(q, k, v, mask)
    # The same as attending over the unmasked keys only.
    idx = jnp.asarray([0, 1, 3])
    ref = attention.dot_product_attention(q, k[:, idx], v[:, idx])
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_head_scores_vjp_equals_autodiff_of_the_einsum():
    kq, kk, kg = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 3, 4))  # [B, T, N, D]
    k = jax.random.normal(kk, (2, 7, 3, 4))  # [B, S, N, D]
    g = jax.random.normal(kg, (2, 3, 5, 7))  # [B, N, T, S]
    out, vjp = jax.vjp(attention.head_scores, q, k)
    ref, ref_vjp = jax.vjp(lambda a, b: jnp.einsum("btnd,bsnd->bnts", a, b), q, k)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(g), ref_vjp(g)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_softmax_equals_jax_and_keeps_only_its_output_for_the_gradient():
    """The attention's softmax: jax.nn.softmax's values and gradient (a masked key as the XLA
    path's float32-minimum bias), with one [.., S] residual where jax.nn.softmax (jax 0.10
    default) keeps the exp, the quotient and a broadcast 1 / sum**2."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 4
    x = x.at[..., 2].set(jnp.finfo(jnp.float32).min)
    g = jax.random.normal(jax.random.key(1), x.shape)
    y, vjp = jax.vjp(attention.softmax, x)
    y_ref, vjp_ref = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(y[..., 2])) == 0.0
    kept = [r for r in jax.tree.leaves(vjp) if r.shape == x.shape]
    assert len(kept) == 1, [r.shape for r in jax.tree.leaves(vjp)]
