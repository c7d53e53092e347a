"""cuDNN's fused (flash) attention behind ``attention.dot_product_attention`` on NVIDIA GPUs.

``fused_attention`` calls ``jax.nn.dot_product_attention``'s cuDNN kernel with the mask in two
parts: causality as cuDNN's causal mask type (it skips the key blocks above the diagonal) and
the rest (padding, packed segments) as a dense mask, which cuDNN adds as a bias. With
``packed`` (``runtime.attention='cudnn_packed'``), a mask made from segment ids alone goes to
cuDNN as each row's segment lengths (and offsets) instead of the dense [B, 1, T, T] mask, which
cuDNN otherwise reads for every head, and cuDNN skips the blocks outside the segments. The
number of segments per row it describes is static, M
(``MAX_SEGMENTS``: ``runtime.packed_max_segments``, default ``PACKED_MAX_SEGMENTS``):

- M = 1, padded rows (one sequence per row from token 0, then padding; BERT's padding mask):
  ``jax.nn.dot_product_attention``'s sequence lengths (cuDNN's padding mask type).
- M > 1, packed rows: cuDNN's packed (THD) layout, with the segment offsets
  (``segment_spans``), which jax exposes only in its internal module
  ``jax._src.cudnn.fused_attention_stablehlo`` (the one ``jax.nn`` calls). cuDNN's softmax
  statistics then take B x M x N x T floats per layer (M x those of M = 1), and it may walk
  every (row, segment slot) pair. Grouped-query heads take the dense mask on a jax whose packed
  layout strides the keys by the query heads (jax 0.10).

A batch that the layout does not describe (a row with more than M segments, a segment id in two
runs, with M = 1 a sequence not starting at token 0) takes the dense mask (a ``lax.cond``;
under differentiation both branches' residuals are kept), so every real token's result is the
same either way (padding tokens come out as zeros in the lengths branch).
Not yet run on a GPU: ``tests/models/test_attention.py`` has the GPU checks against the XLA
path (one device; under a batch-sharded mesh the offsets rely on sharding propagation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sft_jax.models.trace_setting import TraceSetting

Array = jax.Array
PACKED_MAX_SEGMENTS = 16  # default segments per row described; rows with more: dense mask

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _checked_segments(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"runtime.packed_max_segments={m!r}; use a positive int (1: padded rows)")
    return m


# Segments per row that cudnn_packed describes (runtime.packed_max_segments; 1: padded rows).
MAX_SEGMENTS = TraceSetting("packed_max_segments", PACKED_MAX_SEGMENTS, _checked_segments)


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
                return _segments_or_dense(q, k, v, dense, causal, segment_ids)
            except NotImplementedError:  # e.g. the packed layout before Hopper
                _warn_once("cuDNN's segment lengths refused here; using its dense mask")
        return _dense(q, k, v, dense, causal)
    except NotImplementedError:
        return None  # shapes the fused kernel does not take: the XLA path
    except RuntimeError as e:  # no cuDNN here
        _warn_once(f"runtime.attention='cudnn' unavailable ({e}); using the XLA attention")
        return None


def _dense(
    q: Array, k: Array, v: Array, dense: Array | None, causal: bool, seqlen: Array | None = None
) -> Array:
    if dense is not None:
        dense = jnp.broadcast_to(dense, (q.shape[0], 1, q.shape[1], k.shape[1]))
    with _mask_without_gradient():
        return jax.nn.dot_product_attention(
            q, k, v, mask=dense, is_causal=causal, query_seq_lengths=seqlen,
            key_value_seq_lengths=seqlen, implementation="cudnn",
        )  # fmt: skip


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


def _segments_or_dense(
    q: Array, k: Array, v: Array, dense: Array | None, causal: bool, segment_ids: Array
) -> Array:
    """The segment lengths (M = 1) or packed layout (M > 1) when they describe every row, else
    the dense mask (both are traced; the batch picks one at run time, and under
    differentiation both branches' residuals are kept)."""
    m = MAX_SEGMENTS.get()
    lengths, offsets = segment_spans(segment_ids, m)
    fits = described(segment_ids, lengths, offsets)
    if m == 1:
        seqlen = jnp.maximum(lengths[:, 0], 0)
        call = lambda q, k, v: _dense(q, k, v, None, causal, seqlen)
    else:
        call = _packed_call(q, k, causal, lengths, offsets)
    real = (segment_ids != 0)[:, :, None, None]  # padding tokens belong to no segment

    def segments(q: Array, k: Array, v: Array) -> Array:
        # cuDNN reads and writes only tokens inside a segment: zero the rest on the way in
        # (their gradients then are zeros, whatever cuDNN leaves there) and on the way out.
        out = call(*(jnp.where(real, x, jnp.zeros((), x.dtype)) for x in (q, k, v)))
        return jnp.where(real, out, jnp.zeros((), out.dtype))

    return jax.lax.cond(fits, segments, lambda q, k, v: _dense(q, k, v, dense, causal), q, k, v)


def _packed_call(
    q: Array, k: Array, causal: bool, lengths: Array, offsets: Array
) -> Callable[[Array, Array, Array], Array]:
    """cuDNN's packed layout: attention within each described segment."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if k.shape[2] != q.shape[2] and not _kv_offsets_use_kv_heads():
        raise NotImplementedError("this jax's packed layout strides keys by the query heads")
    mask_type = fused.MaskType.CAUSAL if causal else fused.MaskType.NO_MASK
    return lambda q, k, v: fused.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5, mask_type=mask_type, qkv_layout="BTNH",
    )  # fmt: skip


def described(segment_ids: Array, lengths: Array, offsets: Array) -> Array:
    """Whether ``segment_spans``'s lengths and offsets (M = ``lengths.shape[1]``) describe every
    row of ``segment_ids``: at most M segments, each one contiguous run, and with M = 1 (cuDNN's
    sequence lengths) the sequence starting at token 0."""
    fits = jnp.logical_and(
        jnp.max(segment_ids) <= lengths.shape[1], _contiguous(segment_ids, lengths, offsets)
    )
    if lengths.shape[1] == 1:
        fits = jnp.logical_and(fits, jnp.all(offsets[:, 0] <= 0))
    return fits


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
