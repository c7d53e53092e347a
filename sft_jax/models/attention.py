"""Attention: boolean masks (padding, packed segments, causal, KV-cache offsets), scaled
dot-product attention with grouped-query heads (an XLA einsum path with a float32 softmax, or
cuDNN's fused kernel on NVIDIA GPUs), and the ``SelfAttention`` module of the encoder families.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sft_jax.models import cudnn_attention, trace_setting
from sft_jax.models.dropout import dropout
from sft_jax.models.layers import Array, Dense, Initializer, default_kernel_init


def make_attention_mask(
    q_len: int,
    kv_len: int | None = None,
    *,
    padding_mask: Array | None = None,
    segment_ids: Array | None = None,
    causal: bool = False,
    q_offset: int | Array | None = None,
) -> Array | None:
    """Builds a boolean attention mask (True = may attend) from its optional parts.

    Args:
        q_len: Number of query positions T.
        kv_len: Number of key positions S (default T). With ``causal``, the queries are the
            last T of the S positions (KV-cache decoding), unless ``q_offset`` says otherwise.
        padding_mask: [B, S] 1/0 (or bool) marking real key tokens.
        segment_ids: [B, T] ints for packed sequences (requires S == T); tokens attend only
            within their own segment.
        causal: Forbid attending to later positions.
        q_offset: Key slot of the first query (may be traced), for a fixed-size KV cache whose
            filled part ends before S; default ``S - T``.

    Returns:
        Bool [B or 1, 1, T, S], broadcastable over heads, or None when nothing is masked.
    """
    kv_len = q_len if kv_len is None else kv_len
    mask = None

    def _and(a: Array | None, b: Array) -> Array:
        return b if a is None else jnp.logical_and(a, b)

    if padding_mask is not None:
        mask = _and(mask, padding_mask.astype(bool)[:, None, None, :])  # [B, 1, 1, S]
    if segment_ids is not None:
        if kv_len != q_len:
            raise ValueError("segment_ids need q_len == kv_len")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
        mask = _and(mask, same[:, None])
    if causal:
        offset = kv_len - q_len if q_offset is None else q_offset
        q_pos = jnp.arange(q_len)[:, None] + offset  # [T, 1]
        mask = _and(mask, (jnp.arange(kv_len)[None, :] <= q_pos)[None, None])  # [1, 1, T, S]
    return mask


@struct.dataclass
class AttentionMask:
    """A self-attention mask kept in parts, so that a fused kernel can use its structure.

    ``dense``: bool, broadcastable to [B, 1, T, S] (True = may attend; padding, packed
    segments), or None. ``causal``: also forbid attending to later positions (needs T == S:
    query i sees keys 0..i). ``dot_product_attention`` takes it wherever it takes a bool mask:
    the XLA path applies ``materialize()``; the cuDNN kernel gets ``causal`` as its causal mask
    type, which skips the key blocks above the diagonal instead of reading a dense mask over
    all of them (and the dense part, where there is one, as its mask). ``segment_ids``: [B, T]
    ids (1, 2, ... per sequence, 0 on padding) that say which keys each real token sees as
    ``dense`` does: the packed-segment ids when ``dense`` was made from them alone, or an
    encoder's padding mask as one segment per row; cuDNN then gets sequence lengths (and
    offsets) instead of the dense mask (``cudnn_attention``; padding tokens' outputs become
    zeros there). A pytree whose ``causal`` is static, so it can cross ``jit`` / ``checkpoint``
    boundaries.
    """

    dense: Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)
    segment_ids: Array | None = None

    def materialize(self, q_len: int, kv_len: int) -> Array | None:
        """The whole mask as one bool array [B or 1, 1, T, S], or None when nothing is masked."""
        if not self.causal:
            return self.dense
        if q_len != kv_len:
            raise ValueError(f"a causal AttentionMask needs T == S, got T={q_len}, S={kv_len}")
        tril = make_attention_mask(q_len, causal=True)
        return tril if self.dense is None else jnp.logical_and(self.dense, tril)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "cudnn_packed")
_IMPLEMENTATION = trace_setting.choice("attention", ATTENTION_IMPLEMENTATIONS, "xla")


def attention_implementation(name: str) -> contextlib.AbstractContextManager[None]:
    """Selects the attention kernel for models traced inside the block.

    ``"xla"`` (default): the einsum + float32 softmax below, on every backend. ``"cudnn"``:
    ``jax.nn.dot_product_attention``'s fused cuDNN (flash) kernel on NVIDIA GPUs, for bfloat16 /
    float16 compute without attention-probability dropout, where cuDNN takes the shapes
    (otherwise the XLA path is used; on a machine without cuDNN too, with a warning).
    The choice is read when a function is traced: select it before the first call of a jitted
    step (a cached trace keeps the kernel it was traced with). On an H200 the cuDNN kernel
    matches the XLA path to bfloat16 rounding (outputs and gradients, causal + packed + GQA).
    ``"cudnn_packed"``: the same, with a mask made from segment ids
    (``AttentionMask.segment_ids``: packed rows, padding) passed as cuDNN's sequence lengths
    and packed layout instead of a dense mask (``cudnn_attention``; not yet run on a GPU).
    """
    return _IMPLEMENTATION.scope(name)


def set_attention(name: str) -> None:
    """Sets the attention kernel for the rest of the current context (the process's main thread
    for the command-line entry points), as ``attention_implementation`` does for a block."""
    _IMPLEMENTATION.set(name)


def _fused_attention_applies(q: Array, dropout_rate: float, dropout_rng: Array | None) -> bool:
    return (
        _IMPLEMENTATION.get() in ("cudnn", "cudnn_packed")
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and (dropout_rng is None or dropout_rate == 0.0)
    )


@jax.custom_vjp
def head_scores(q: Array, k: Array) -> Array:
    """``einsum("btnd,bsnd->bnts", q, k)``: per-head scores [B, N, T, S] of q [B, T, N, D] and
    k [B, S, N, D]. Its own VJP writes the key gradient as ``(q^T dS)^T``: autodiff's
    ``dS^T q`` contracts the scores' gradient over its second-to-last axis, which XLA CPU either
    copies transposed or multiplies slowly (oneDNN, a third of the other attention matmuls'
    rate); ``q^T dS`` transposes the small operand instead (README "Speed"). Being a
    ``custom_vjp``, it has reverse-mode derivatives only (no ``jax.jvp``)."""
    return jnp.einsum("btnd,bsnd->bnts", q, k)


def _head_scores_fwd(q: Array, k: Array) -> tuple[Array, tuple[Array, Array]]:
    return head_scores(q, k), (q, k)


def _head_scores_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    q, k = res
    dq = jnp.einsum("bnts,bsnd->btnd", g, k)
    dk_t = jnp.einsum("btnd,bnts->bnds", q, g)  # [B, N, D, S]
    return dq, jnp.transpose(dk_t, (0, 3, 1, 2))


head_scores.defvjp(_head_scores_fwd, _head_scores_bwd)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | AttentionMask | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Scaled dot-product attention with grouped-query support; softmax in float32.

    Args:
        q: Queries [B, T, N, D].
        k: Keys [B, S, K, D]; N must be a multiple of K (K < N is GQA/MQA).
        v: Values [B, S, K, D].
        mask: Bool, broadcastable to [B, 1, T, S] (True = attend), an ``AttentionMask``, or
            None.
        dropout_rate: Dropout on the attention probabilities.
        dropout_rng: Key enabling that dropout.

    Returns:
        [B, T, N, D] in q's dtype.
    """
    if not isinstance(mask, AttentionMask):
        mask = AttentionMask(mask)
    if _fused_attention_applies(q, dropout_rate, dropout_rng) and (
        not mask.causal or q.shape[1] == k.shape[1]  # else materialize() names the error
    ):
        out = cudnn_attention.fused_attention(
            q, k, v, mask.dense, mask.causal, mask.segment_ids,
            packed=_IMPLEMENTATION.get() == "cudnn_packed",
        )  # fmt: skip
        if out is not None:
            return out
    return _xla_attention(q, k, v, mask.materialize(q.shape[1], k.shape[1]), dropout_rate,
                          dropout_rng)  # fmt: skip


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """Softmax over the last axis whose derivative keeps only its output (``y * (dx - sum(y *
    dx))``). ``jax.nn.softmax`` on jax 0.10 is differentiated through its exp, sum and divide
    unless ``jax_softmax_custom_jvp`` is set, so the attention's backward pass kept the exp,
    the quotient and a broadcast 1 / sum**2: two more [B, N, T, S] float32 buffers per layer."""
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    y = softmax(x)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


def _xla_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    dropout_rate: float,
    dropout_rng: Array | None,
) -> Array:
    """The einsum + float32 softmax attention of ``dot_product_attention`` (bool mask)."""
    b, t, n, d = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"{n} query heads is not a multiple of {kh} key/value heads")
    # Without grouping (K == N) the scores are 4-D [B, N, T, S]: with a unit group axis XLA CPU
    # computes them transposed and copies them in both passes (README "Speed").
    grouped = kh != n
    # float16 ends at 65504: scale q before the product, so that scores sqrt(D) times their
    # final size (q.k of 64-dim heads whose entries are about 32) cannot overflow.
    prescale = q.dtype == jnp.float16
    if prescale:
        q = q * jnp.asarray(d**-0.5, q.dtype)
    if grouped:
        qg = q.reshape(b, t, kh, n // kh, d)  # [B, T, K, G, D]
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    else:
        scores = head_scores(q, k)
    scores = scores.astype(jnp.float32) * (1.0 if prescale else d**-0.5)
    if mask is not None:
        # An additive bias (0 or the float32 minimum) rather than a select: the same softmax,
        # and its gradient passes the scores' gradient through unchanged (no [B, N, T, S]
        # select in the backward pass).
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        scores = scores + (bias[:, :, None] if grouped else bias)  # [B, K, G, T, S] / [B, N, T, S]
    probs = softmax(scores)
    probs = dropout(probs, dropout_rate, dropout_rng).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd" if grouped else "bnts,bsnd->btnd", probs, v)
    return out.reshape(b, t, n, d).astype(q.dtype)


class SelfAttention(nnx.Module):
    """Multi-head (or grouped-query) self-attention: ``query``/``key``/``value`` projections,
    attention, and an optional output projection ``out``.

    Families whose output projection lives elsewhere (BERT's ``attention.output.dense``) pass
    ``out_proj=False`` and get the merged heads [B, T, N*D]. Positional transforms (RoPE) and a
    KV cache belong between the projections and ``dot_product_attention`` when added.

    Args:
        hidden_size: Input (and output) size.
        num_heads: Query heads N.
        num_kv_heads: Key/value heads K (default N).
        head_dim: Per-head size D (default hidden_size // num_heads).
        use_bias: Biases on the q/k/v (and out) projections.
        out_proj: Add the ``out`` projection [N*D, hidden].
        kernel_init: Initializer of all projection kernels.
        dtype: Compute dtype.
        param_dtype: Storage dtype.
        rngs: RNG streams for initialization.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = True,
        out_proj: bool = True,
        kernel_init: Initializer = default_kernel_init,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        kw = dict(
            use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip
        q_size, kv_size = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.query = Dense(hidden_size, q_size, names=("embed", "heads"), **kw)
        self.key = Dense(hidden_size, kv_size, names=("embed", "heads"), **kw)
        self.value = Dense(hidden_size, kv_size, names=("embed", "heads"), **kw)
        self.out = Dense(q_size, hidden_size, names=("heads", "embed"), **kw) if out_proj else None

    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        *,
        dropout_rate: float = 0.0,
        dropout_rng: Array | None = None,
    ) -> Array:
        """Attends [B, T, hidden] -> [B, T, hidden] (or [B, T, N*D] without ``out``).

        Args:
            x: Input [B, T, hidden].
            mask: From ``make_attention_mask``: bool [B or 1, 1, T, T], or None.
            dropout_rate: Attention-probability dropout rate.
            dropout_rng: Key enabling that dropout.
        """
        b, t, _ = x.shape
        q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, D]
        k = self.key(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        v = self.value(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        y = dot_product_attention(
            q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        ).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, N*D]
        return self.out(y) if self.out is not None else y
