"""cuDNN's fused (flash) attention behind ``attention.dot_product_attention`` on NVIDIA GPUs.

``fused_attention`` calls ``jax.nn.dot_product_attention``'s cuDNN kernel with the mask in two
parts: causality as cuDNN's causal mask type (it skips the key blocks above the diagonal) and
the rest (padding, packed segments) as a dense mask, which cuDNN adds as a bias. With
``packed`` (``runtime.attention='cudnn_packed'``), rows packed with several sequences go to
cuDNN's packed (THD) layout instead: each row's segment offsets and lengths
(``segment_spans``) replace the dense [B, 1, T, T] segment mask, which cuDNN otherwise reads
for every head. jax exposes that layout only in its internal module
``jax._src.cudnn.fused_attention_stablehlo`` (the same one ``jax.nn`` calls), and it needs a
static number of segments per row: a batch with a row of more than ``PACKED_MAX_SEGMENTS``
segments, or with a segment id in two runs, takes the dense mask (a ``lax.cond``; under
differentiation both branches' residuals are kept), so every real token's result is the same
either way (padding tokens come out as zeros in the packed branch). Grouped-query heads take
the dense mask on a jax whose packed layout strides the keys by the query heads (jax 0.10).
Not yet run on a GPU: ``tests/models/test_attention.py`` has the GPU checks against the XLA
path (one device; under a batch-sharded mesh the offsets rely on sharding propagation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

import jax
import jax.numpy as jnp

Array = jax.Array
PACKED_MAX_SEGMENTS = 16  # segments per row in the packed layout; rows with more: dense mask

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def fused_attention(
    q: Array,
    k: Array,
    v: Array,
    dense: Array | None,
    causal: bool,
    segment_ids: Array | None = None,
    packed: bool = False,
) -> Array | None:
    """Attention of q [B, T, N, D], k and v [B, S, K, D] on cuDNN, or None where cuDNN refuses
    the shapes (e.g. ViT's 197 tokens) or is missing (a CPU or TPU run of a GPU config), so the
    caller takes the XLA path.

    Args:
        dense: Bool mask broadcastable to [B, 1, T, S] (True = may attend), or None.
        causal: Query i sees keys 0..i (T == S).
        segment_ids: [B, T] packed-segment ids (1, 2, ... each in one contiguous run, 0 =
            padding) that ``dense`` was made from alone, or None.
        packed: Use the packed layout for ``segment_ids`` (``runtime.attention='cudnn_packed'``).
    """
    try:  # cuDNN checks the shapes while tracing
        if packed and segment_ids is not None:
            try:
                return _packed_or_dense(q, k, v, dense, causal, segment_ids)
            except NotImplementedError:  # e.g. the packed layout before Hopper
                _warn_once("cuDNN's packed attention layout refused here; using its dense mask")
        return _dense(q, k, v, dense, causal)
    except NotImplementedError:
        return None  # shapes the fused kernel does not take: the XLA path
    except RuntimeError as e:  # no cuDNN here
        _warn_once(f"runtime.attention='cudnn' unavailable ({e}); using the XLA attention")
        return None


def _dense(q: Array, k: Array, v: Array, dense: Array | None, causal: bool) -> Array:
    if dense is not None:
        dense = jnp.broadcast_to(dense, (q.shape[0], 1, q.shape[1], k.shape[1]))
    with _mask_without_gradient():
        return jax.nn.dot_product_attention(
            q, k, v, mask=dense, is_causal=causal, implementation="cudnn"
        )


def segment_spans(segment_ids: Array, max_segments: int) -> tuple[Array, Array]:
    """Each row's segments 1..``max_segments`` as cuDNN's packed layout takes them: lengths
    [B, M] and start offsets [B, M + 1], int32, -1 where a row has no such segment (the last
    offset column is always -1). Needs each segment id in one contiguous run (as the packing
    pipeline writes rows); ids above ``max_segments`` are not described."""
    ids = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    member = segment_ids.astype(jnp.int32)[:, None, :] == ids[None, :, None]  # [B, M, T]
    lengths = member.sum(-1, dtype=jnp.int32)
    starts = jnp.argmax(member, axis=-1).astype(jnp.int32)
    present = lengths > 0
    offsets = jnp.pad(jnp.where(present, starts, -1), ((0, 0), (0, 1)), constant_values=-1)
    return jnp.where(present, lengths, -1), offsets


def _packed_or_dense(
    q: Array, k: Array, v: Array, dense: Array | None, causal: bool, segment_ids: Array
) -> Array:
    """The packed layout when every row has at most ``PACKED_MAX_SEGMENTS`` segments, each in
    one contiguous run, else the dense mask (both are traced; the batch picks one at run time,
    and under differentiation both branches' residuals are kept)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if k.shape[2] != q.shape[2] and not _kv_offsets_use_kv_heads():
        raise NotImplementedError("this jax's packed layout strides keys by the query heads")
    lengths, offsets = segment_spans(segment_ids, PACKED_MAX_SEGMENTS)
    mask_type = fused.MaskType.CAUSAL if causal else fused.MaskType.NO_MASK
    real = (segment_ids != 0)[:, :, None, None]  # padding tokens belong to no segment

    def packed(q: Array, k: Array, v: Array) -> Array:
        # cuDNN reads and writes only tokens inside a segment: zero the rest on the way in
        # (their gradients then are zeros, whatever cuDNN leaves there) and on the way out.
        q, k, v = (jnp.where(real, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
        out = fused.dot_product_attention(
            q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
            kv_offsets=offsets, scale=q.shape[-1] ** -0.5, mask_type=mask_type,
            qkv_layout="BTNH",
        )  # fmt: skip
        return jnp.where(real, out, jnp.zeros((), out.dtype))

    fits = jnp.logical_and(
        jnp.max(segment_ids) <= PACKED_MAX_SEGMENTS, _contiguous(segment_ids, lengths, offsets)
    )
    return jax.lax.cond(fits, packed, lambda q, k, v: _dense(q, k, v, dense, causal), q, k, v)


def _contiguous(segment_ids: Array, lengths: Array, offsets: Array) -> Array:
    """Whether each described segment is one run: its ``length`` tokens from its offset on all
    carry its id (``segment_spans`` counts tokens and takes the first one)."""
    t = segment_ids.shape[1]
    ids = jnp.arange(1, lengths.shape[1] + 1, dtype=jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)
    start, end = offsets[:, :-1, None], offsets[:, :-1, None] + lengths[:, :, None]
    inside = (pos >= start) & (pos < end)  # [B, M, T]
    same = segment_ids.astype(jnp.int32)[:, None, :] == ids[None, :, None]
    return jnp.all(jnp.where(lengths[:, :, None] > 0, inside == same, True))


@functools.cache
def _kv_offsets_use_kv_heads() -> bool:
    """Whether this jax strides the keys' packed offsets by the key heads (jax 0.10 used the
    query heads, so with grouped-query attention it read keys from the wrong tokens)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    fix = getattr(fused, "_fix_seqlen_offsets", None)
    if fix is None:
        return False
    with jax.ensure_compile_time_eval():  # first called while a step is being traced
        q, k = jnp.zeros((1, 4, 2, 1)), jnp.zeros((1, 4, 1, 1))
        seqlen, offsets = jnp.asarray([[2, 2]]), jnp.asarray([[0, 2, -1]])
        _, _, _, kv_offsets = fix(seqlen, seqlen, offsets, offsets, q, k)
        return int(kv_offsets.ravel()[1]) == 2  # segment 2 starts at token 2 x 1 head x 1 dim


_no_bias_gradient = threading.Lock()


@contextlib.contextmanager
def _mask_without_gradient():
    """Keeps jax's cuDNN wrapper from computing the gradient of the mask while tracing a call.

    jax 0.10 (the pinned version) passes a mask to cuDNN as an additive bias and asks for that
    bias's gradient whatever it is (``fused_attention_stablehlo.should_export_dbias`` returns
    True): the backward kernel then writes a [B, N, T, S] score gradient and reduces it over
    the heads, for a constant (a mask has no gradient). With it answering False, the backward
    call returns dq, dk, dv only and jax's VJP gives the mask a zero cotangent, as before. Our
    masks are the only biases traced here (the lock orders our calls; nothing else in the
    process calls the cuDNN wrapper with a trainable bias). jax 0.11 dropped the function and
    skips a boolean mask's gradient itself: there this does nothing.
    """
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:  # a jax without the module: nothing to switch
        yield
        return
    if not callable(getattr(fused, "should_export_dbias", None)):  # jax >= 0.11
        yield
        return
    with _no_bias_gradient:
        export = fused.should_export_dbias
        fused.should_export_dbias = lambda *args, **kwargs: False
        try:
            yield
        finally:
            fused.should_export_dbias = export


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)
