"""Shared Flax NNX layers: Dense, Embed, LayerNorm, attention, masks, dropout, activations.

Every parameter is an ``nnx.Param`` annotated with logical axis names (``out_sharding``
metadata), e.g. ``("embed", "mlp")``. The names used across the model families are:

- ``"vocab"``: token vocabulary rows of an embedding table.
- ``"embed"``: the model (hidden) dimension.
- ``"mlp"``: the feed-forward inner dimension.
- ``"heads"``: attention heads x head_dim, flattened (q/k/v kernels are [embed, heads]).
- ``"kv"``: the per-head dimension when it is kept separate (caches, unflattened kernels).
- ``"norm"``: norm scales/biases (normally replicated).
- ``None``: never sharded (tiny axes such as position/type tables or a label head).

``sft_jax.sharding`` maps these names to mesh axes. The parameters are annotated but not placed
(``eager_sharding=False``): models build without a mesh, and placement happens once, from the
logical names, when the train state is created under jit with explicit out_shardings.

Dropout is functional: it is applied iff a PRNG key is passed, so modules store no RNG state and
the only Variables in a model are ``nnx.Param``. Layers whose call sites pass no key (LoRA
adapters inside ``Dense`` slots) read an ambient one: ``dropout_scope(rng)`` sets it for the
duration of a model call and ``scoped_rng(salt)`` derives a per-layer key from it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

Array = jax.Array
Initializer = Callable[..., Array]
LogicalNames = tuple[str | None, ...]

default_kernel_init = nnx.initializers.normal(stddev=0.02)


def make_param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    names: LogicalNames,
    param_dtype: Any = jnp.float32,
) -> nnx.Param:
    """Creates an ``nnx.Param`` carrying logical axis names.

    Args:
        rngs: RNG streams; ``rngs.params()`` seeds the initializer (unused by constant inits).
        init: ``init(key, shape, dtype) -> Array``.
        shape: Parameter shape.
        names: One logical axis name (or None) per dimension.
        param_dtype: Storage dtype.

    Returns:
        The Param, with ``out_sharding=names`` metadata and eager sharding off.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = init(key, tuple(shape), jnp.dtype(param_dtype))
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` over the last axis; kernel is [in, out].

    Args:
        in_features: Input size.
        out_features: Output size.
        names: Logical names of the kernel axes (input, output); the bias takes the output one.
        use_bias: Whether to add a bias.
        dtype: Compute dtype (inputs and kernel are cast to it).
        param_dtype: Storage dtype of the parameters.
        kernel_init: Kernel initializer (default normal(0.02), as BERT/GPT-2/Llama).
        rngs: RNG streams for initialization.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: LogicalNames = ("embed", "mlp"),
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype)
        self.kernel = make_param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, (out_features,), names[-1:], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        """Applies the layer: [..., in] -> [..., out]."""
        y = matmul_2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def matmul_2d(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` for x [..., in] as one [rows, in] x [in, out] matmul. The same product as
    ``jnp.dot(x, kernel)``; written 2-D, its gradient's weight matmul contracts one row axis
    instead of all leading axes, which XLA CPU lays out with fewer transposes (a MiniLM training
    step on this 2-core CPU about 7% faster, README "Speed")."""
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def config_dense(
    cfg: Any,
    n_in: int,
    n_out: int,
    names: Sequence[str | None],
    rngs: nnx.Rngs,
    use_bias: bool = True,
) -> Dense:
    """A ``Dense`` with a model config's dtypes and ``normal(initializer_range)`` kernel init."""
    return Dense(
        n_in,
        n_out,
        names=names,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        rngs=rngs,
    )


class Embed(nnx.Module):
    """Embedding table [num_embeddings, features] with a lookup and a tied-output ``attend``.

    Args:
        num_embeddings: Number of rows (vocabulary, positions, token types).
        features: Embedding size.
        names: Logical names of (rows, features); use ``(None, "embed")`` for small tables.
        dtype: Compute dtype of the output.
        param_dtype: Storage dtype.
        embedding_init: Initializer (default normal(0.02)).
        rngs: RNG streams for initialization.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        names: LogicalNames = ("vocab", "embed"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype)
        self.embedding = make_param(
            rngs, embedding_init, (num_embeddings, features), names, param_dtype
        )

    def __call__(self, ids: Array) -> Array:
        """Looks up rows: int [...] -> [..., features].

        Ids outside ``[0, num_embeddings)`` are clipped to the nearest row. ``jnp.take``'s
        default fills them with NaN instead, and a NaN at a masked padding key still turns every
        real token's attention output into NaN (masking multiplies it by 0, and 0 * NaN = NaN):
        one padding id equal to the vocabulary size would poison the whole row. Real ids are
        checked where they come from (the data pipeline checks that the tokenizer fits the
        vocabulary, ``generate`` checks prompts), and BERT and GPT-2 check the sequence length
        against their position tables.
        """
        return jnp.take(self.embedding[...], ids, axis=0, mode="clip").astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Tied output projection: [..., features] -> [..., num_embeddings]."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class LayerNorm(nnx.Module):
    """Layer normalization over the last axis, computed in float32.

    Args:
        features: Size of the normalized axis.
        epsilon: Added to the variance.
        use_bias: Learn a shift (``bias``).
        use_scale: Learn a gain (``scale``).
        dtype: Output dtype.
        param_dtype: Storage dtype.
        rngs: RNG streams (constant init; kept for a uniform constructor).
    """

    def __init__(
        self,
        features: int,
        *,
        epsilon: float = 1e-5,
        use_bias: bool = True,
        use_scale: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.epsilon = float(epsilon)
        self.dtype = jnp.dtype(dtype)

        def norm_param(init: Initializer) -> nnx.Param:
            return make_param(rngs, init, (features,), ("norm",), param_dtype)

        self.scale = norm_param(nnx.initializers.ones) if use_scale else None
        self.bias = norm_param(nnx.initializers.zeros) if use_bias else None

    def __call__(self, x: Array) -> Array:
        """Normalizes [..., features] -> [..., features]."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; identity when ``rng`` is None or ``rate`` is 0.

    Args:
        x: Any array.
        rate: Probability of zeroing an element.
        rng: PRNG key, or None for inference.

    Returns:
        ``x`` with elements dropped and the rest scaled by ``1 / (1 - rate)``.
    """
    if rng is None or rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    if _dropout_impl.get() == "hash":
        keep = hashed_keep_mask(rng, 1.0 - rate, x.shape)
    else:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


DROPOUT_IMPLEMENTATIONS = ("threefry", "hash")
_dropout_impl: contextvars.ContextVar[str] = contextvars.ContextVar("dropout", default="threefry")


@contextlib.contextmanager
def dropout_implementation(name: str):
    """Selects how dropout masks are drawn in models traced inside the block.

    ``"threefry"`` (default): ``jax.random.bernoulli`` with the key. ``"hash"``: a
    counter-based integer hash of each element's index and a seed drawn from the key
    (``hashed_keep_mask``), about 8x cheaper on CPU, where mask generation is a large part of a
    BERT step. Both are deterministic functions of the key; they draw different masks. Like
    ``attention_implementation``, the choice is read when a function is traced.
    """
    token = _dropout_impl.set(_checked("dropout", name, DROPOUT_IMPLEMENTATIONS))
    try:
        yield
    finally:
        _dropout_impl.reset(token)


def set_implementations(attention: str = "xla", dropout: str = "threefry") -> None:
    """Sets the attention kernel and dropout-mask implementation for the rest of the current
    context (the process's main thread for the command-line entry points), as the context
    managers ``attention_implementation`` / ``dropout_implementation`` do for a block."""
    _attention_impl.set(_checked("attention", attention, ATTENTION_IMPLEMENTATIONS))
    _dropout_impl.set(_checked("dropout", dropout, DROPOUT_IMPLEMENTATIONS))


def _checked(kind: str, name: str, choices: tuple[str, ...]) -> str:
    """``name`` if it is one of ``choices``, else a ValueError naming the ``kind`` and choices."""
    if name not in choices:
        raise ValueError(f"{kind} implementation {name!r}; use one of {choices}")
    return name


def _fmix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finalizer: a bijection that mixes every input bit into every output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hashed_keep_mask(rng: Array, keep_prob: float, shape: Sequence[int]) -> Array:
    """Bool mask, True with probability ``keep_prob`` per element: ``fmix32((index * golden) ^
    seed) < keep_prob * 2**32`` with a 32-bit seed drawn from ``rng`` (element indices count the
    flattened array, so masks do not depend on how the array is sharded)."""
    seed = jax.random.bits(rng, (), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = _fmix32((index * jnp.uint32(0x9E3779B1)) ^ seed)
    return h < jnp.uint32(min(int(keep_prob * 2**32), 2**32 - 1))


def split_rng(rng: Array | None, num: int) -> list[Array | None]:
    """Splits a dropout key into ``num`` keys, or returns ``num`` Nones when ``rng`` is None."""
    if rng is None:
        return [None] * num
    return list(jax.random.split(rng, num))


# The ambient dropout key (already folded with _SCOPE_STREAM), or None outside a training call.
_SCOPED_KEY: contextvars.ContextVar[Array | None] = contextvars.ContextVar(
    "sft_jax_scoped_dropout_key", default=None
)
# Separates scoped keys from the fold_in(rng, i) / split(rng) keys that models derive themselves.
_SCOPE_STREAM = 0x5C0E


@contextlib.contextmanager
def dropout_scope(rng: Array | None) -> Iterator[None]:
    """Makes ``rng`` the ambient dropout key while the block runs (None: no dropout).

    For layers whose callers pass no key (e.g. a LoRA adapter behind a ``Dense`` call site). The
    tasks wrap every model call in it with the step's dropout key. It is plain Python state read
    while tracing, so it works under ``jit``/``grad``/``scan`` as long as the scope is opened
    inside the traced function (as the tasks do).

    Args:
        rng: PRNG key, or None for inference (``scoped_rng`` then returns None).
    """
    key = None if rng is None else jax.random.fold_in(rng, _SCOPE_STREAM)
    token = _SCOPED_KEY.set(key)
    try:
        yield
    finally:
        _SCOPED_KEY.reset(token)


def scoped_rng(salt: int) -> Array | None:
    """The ambient dropout key folded with ``salt`` (one fixed salt per layer), or None."""
    key = _SCOPED_KEY.get()
    return None if key is None else jax.random.fold_in(key, salt)


def gelu_erf(x: Array) -> Array:
    """Exact GELU, ``x / 2 * (1 + erf(x / sqrt(2)))``: PyTorch's formula. ``jax.nn.gelu``'s exact
    form goes through ``erfc``, whose piecewise evaluation cost a MiniLM training step on CPU
    about 40 ms more; the two agree to float32 rounding (tests/models/test_layers.py)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_erf,  # exact erf form (HF "gelu")
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation for a Hugging Face ``hidden_act`` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


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
    all of them (and the dense part, where there is one, as its mask). A pytree whose ``causal``
    is static, so it can cross ``jit`` / ``checkpoint`` boundaries.
    """

    dense: Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)

    def materialize(self, q_len: int, kv_len: int) -> Array | None:
        """The whole mask as one bool array [B or 1, 1, T, S], or None when nothing is masked."""
        if not self.causal:
            return self.dense
        if q_len != kv_len:
            raise ValueError(f"a causal AttentionMask needs T == S, got T={q_len}, S={kv_len}")
        tril = make_attention_mask(q_len, causal=True)
        return tril if self.dense is None else jnp.logical_and(self.dense, tril)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
_attention_impl: contextvars.ContextVar[str] = contextvars.ContextVar("attention", default="xla")


@contextlib.contextmanager
def attention_implementation(name: str):
    """Selects the attention kernel for models traced inside the block.

    ``"xla"`` (default): the einsum + float32 softmax below, on every backend. ``"cudnn"``:
    ``jax.nn.dot_product_attention``'s fused cuDNN (flash) kernel on NVIDIA GPUs, for bfloat16 /
    float16 compute without attention-probability dropout, where cuDNN takes the shapes
    (otherwise the XLA path is used; on a machine without cuDNN too, with a warning).
    The choice is read when a function is traced: select it before the first call of a jitted
    step (a cached trace keeps the kernel it was traced with). On an H200 the cuDNN kernel
    matches the XLA path to bfloat16 rounding (outputs and gradients, causal + packed + GQA).
    """
    token = _attention_impl.set(_checked("attention", name, ATTENTION_IMPLEMENTATIONS))
    try:
        yield
    finally:
        _attention_impl.reset(token)


def _fused_attention_applies(q: Array, dropout_rate: float, dropout_rng: Array | None) -> bool:
    return (
        _attention_impl.get() == "cudnn"
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
    if _fused_attention_applies(q, dropout_rate, dropout_rng):
        out = _cudnn_attention(q, k, v, mask)
        if out is not None:
            return out
    return _xla_attention(q, k, v, mask.materialize(q.shape[1], k.shape[1]), dropout_rate,
                          dropout_rng)  # fmt: skip


def _cudnn_attention(q: Array, k: Array, v: Array, mask: AttentionMask) -> Array | None:
    """``jax.nn.dot_product_attention``'s cuDNN kernel, or None for shapes it refuses. The dense
    part goes in as a mask (cuDNN adds it as a bias), the causal part as ``is_causal``."""
    if mask.causal and q.shape[1] != k.shape[1]:
        return None  # the XLA path's materialize() names the error
    dense = mask.dense
    if dense is not None:
        dense = jnp.broadcast_to(dense, (q.shape[0], 1, q.shape[1], k.shape[1]))
    try:  # cuDNN checks the shapes while tracing (e.g. ViT's 197 tokens are refused)
        return jax.nn.dot_product_attention(
            q, k, v, mask=dense, is_causal=mask.causal, implementation="cudnn"
        )
    except NotImplementedError:
        return None  # shapes the fused kernel does not take: the XLA path
    except RuntimeError as e:  # no cuDNN here (a CPU or TPU run of a GPU config)
        _warn_once(f"runtime.attention='cudnn' unavailable ({e}); using the XLA attention")
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger(__name__).warning(message)


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
    if grouped:
        qg = q.reshape(b, t, kh, n // kh, d)  # [B, T, K, G, D]
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    else:
        scores = head_scores(q, k)
    scores = scores.astype(jnp.float32) * (d**-0.5)
    if mask is not None:
        # An additive bias (0 or the float32 minimum) rather than a select: the same softmax,
        # and its gradient passes the scores' gradient through unchanged (no [B, N, T, S]
        # select in the backward pass).
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        scores = scores + (bias[:, :, None] if grouped else bias)  # [B, K, G, T, S] / [B, N, T, S]
    probs = jax.nn.softmax(scores, axis=-1)
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


class RMSNorm(nnx.Module):
    """Root-mean-square normalization (Llama's), computed in float32: ``x / rms(x) * scale``.

    Args:
        features: Size of the normalized axis.
        epsilon: Added to the mean square.
        dtype: Output dtype.
        param_dtype: Storage dtype.
        rngs: RNG streams (constant init; kept for a uniform constructor).
    """

    def __init__(
        self,
        features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.epsilon = float(epsilon)
        self.dtype = jnp.dtype(dtype)
        self.scale = make_param(rngs, nnx.initializers.ones, (features,), ("norm",), param_dtype)

    def __call__(self, x: Array) -> Array:
        """Normalizes [..., features] -> [..., features]."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)
