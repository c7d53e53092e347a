"""Decoder-LM building blocks: rotary position embeddings, the KV cache and causal inputs.

Shared by the Llama family and GPT-2 (``llama.py``, ``gpt2.py``) and by ``generate.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.models import activation_sharding, remat
from sft_jax.models.attention import AttentionMask, make_attention_mask
from sft_jax.models.layers import Array

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Any:
    """RoPE inverse frequencies [D/2] (numpy float32), as transformers' ``ROPE_INIT_FUNCTIONS``.

    Args:
        head_dim: Rotated size D (even).
        theta: Base wavelength (``rope_theta``).
        scaling: None, or a ``rope_scaling`` dict with ``rope_type`` (or ``type``) ``default``,
            ``linear`` (``factor``) or ``llama3`` (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``).
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / np.float32(factor)
    if kind != "llama3":
        raise ValueError(f"unsupported rope type {kind!r}; supported: {ROPE_TYPES}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)  # long wavelengths: / factor
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq: Any) -> tuple[Array, Array]:
    """cos and sin tables [B, T, D] (float32) for int positions [B, T] (half-split layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x [B, T, N, D] by cos/sin [B, T, D] (transformers' ``rotate_half`` convention)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A fixed-size key/value cache: an explicit pytree argument, never module state.

    Attributes:
        keys: Per layer [B, S, K, D].
        values: Per layer [B, S, K, D].
        mask: int32 [B, S]: 1 where a slot holds a real (non-padding) token.
        index: int32 []: the next slot to write (slots are shared by the whole batch).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    mask: Array
    index: Array

    @classmethod
    def create(
        cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype
    ) -> KVCache:
        """An empty cache of ``max_len`` slots."""
        zeros = lambda: jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
        return cls(
            keys=tuple(zeros() for _ in range(num_layers)),
            values=tuple(zeros() for _ in range(num_layers)),
            mask=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def write_kv(cache_k: Array, cache_v: Array, k: Array, v: Array, index: Array):
    """Writes k/v [B, T, K, D] into a layer's cache [B, S, K, D] at slot ``index``."""
    at = (0, index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), at)
    return k_all, v_all


def segment_positions(segment_ids: Array) -> Array:
    """Positions that restart at 0 at every segment change: int [B, T] -> int [B, T]."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def check_cache_room(cache: KVCache, t: int) -> None:
    """Raises unless ``t`` new tokens fit in the cache's free slots.

    Past the last slot ``dynamic_update_slice`` clamps the write onto earlier slots, which
    silently gives wrong logits (transformers' static cache raises instead). The slot count is
    static and always checked; the index is checked when it is concrete (eager calls). Under
    ``jit`` it is traced, and the caller sizes the cache (``generate``: prompt + new tokens).
    """
    slots = cache.mask.shape[1]
    try:
        index = int(cache.index)
    except jax.errors.JAXTypeError:  # traced
        index = 0
    if index + t > slots:
        raise ValueError(
            f"{t} new token(s) at cache slot {index} exceed the KV cache's {slots} slots; "
            "create the cache (init_cache) with room for the prompt and every new token"
        )


def causal_lm_inputs(
    b: int,
    t: int,
    attention_mask: Array | None = None,
    segment_ids: Array | None = None,
    positions: Array | None = None,
    cache: KVCache | None = None,
) -> tuple[Array, Array, Array | None]:
    """The causal attention mask and positions of a decoder call (with or without a cache).

    Default positions count real tokens (``cumsum(mask) - 1``, as transformers' ``generate``),
    so left- and right-padded rows see the positions of their unpadded sequence; with
    ``segment_ids`` they restart per segment; with a cache they continue the cached count.

    Args:
        b: Batch size B.
        t: New tokens T.
        attention_mask: [B, T] 1/0 for the new tokens, or None (all real).
        segment_ids: [B, T] packed-segment ids (0 = padding); not with a cache.
        positions: int [B, T] explicit positions (win over the defaults).
        cache: The cache the new tokens are appended to, or None.

    Returns:
        (``AttentionMask``, positions [B, T], the cache's new mask [B, S] or None). Without a
        cache the mask is ``causal`` plus a dense part for padding and segments (None when
        neither is given); with one it is dense [B, 1, T, S], the causal offset included.
    """
    real = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    real = real.astype(jnp.int32)
    if cache is not None:
        if segment_ids is not None:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
        check_cache_room(cache, t)
        seen = cache.mask.sum(axis=1, keepdims=True)  # [B, 1] real tokens already cached
        new_mask = jax.lax.dynamic_update_slice(cache.mask, real, (0, cache.index))  # [B, S]
        if positions is None:
            positions = jnp.maximum(seen + jnp.cumsum(real, axis=1) - 1, 0)
        s = cache.mask.shape[1]
        mask = make_attention_mask(t, s, padding_mask=new_mask, causal=True, q_offset=cache.index)
        return AttentionMask(mask), positions, new_mask
    if positions is None:
        if segment_ids is not None:
            positions = segment_positions(segment_ids)
        else:
            positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    padding = None if attention_mask is None and segment_ids is None else real
    if segment_ids is not None:
        padding = real * (segment_ids != 0)
    dense = make_attention_mask(t, padding_mask=padding, segment_ids=segment_ids)
    # cuDNN's packed layout may replace the dense mask only where it comes from segments alone.
    packed = segment_ids if attention_mask is None else None
    return AttentionMask(dense, causal=True, segment_ids=packed), positions, None


def run_blocks(
    blocks: Any,
    x: Array,
    mask: AttentionMask,
    cache: KVCache | None,
    cache_mask: Array | None,
    dropout_rng: Array | None,
    call: Any,
) -> tuple[Array, KVCache | None]:
    """Runs a decoder's block stack, threading each layer's cache slice.

    Args:
        blocks: the layer list; block ``i`` gets dropout key ``fold_in(dropout_rng, i)``.
        x: [B, T, H] input hidden states.
        mask: the attention mask from ``causal_lm_inputs``.
        cache: the cache to read and extend, or None (no cache).
        cache_mask: the cache's new padding mask from ``causal_lm_inputs``.
        dropout_rng: key or None.
        call: ``call(block, x, mask, kv, index, rng) -> (x, kv)`` for one block.

    Returns:
        (hidden states [B, T, H], the new cache or None). The hidden states between blocks keep
        the batch's layout (``activation_sharding``).
    """
    keys, values = [], []
    for i, block in enumerate(blocks):
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        kv = None if cache is None else (cache.keys[i], cache.values[i])
        index = None if cache is None else cache.index
        x, kv = remat.apply(
            block, activation_sharding.constrain(x), mask, kv, index, rng, call=call
        )
        if cache is not None:
            keys.append(kv[0])
            values.append(kv[1])
    x = activation_sharding.constrain(x)
    if cache is None:
        return x, None
    return x, KVCache(tuple(keys), tuple(values), cache_mask, cache.index + x.shape[1])


class CausalLM:
    """``__call__`` and ``hidden_states`` of the decoder LMs (mixed into ``LlamaForCausalLM`` and
    ``GPT2LMHeadModel`` before ``nnx.Module``). A subclass provides ``backbone()`` (its block
    stack: ``(input_ids, attention_mask, *, segment_ids, positions, dropout_rng, cache) ->
    (final hidden states [B, T, H], new cache or None)``) and ``head_parts()`` (its LM head)."""

    def backbone(self) -> Any:
        raise NotImplementedError

    def head_parts(self) -> tuple[Any, Callable[[Any, Array], Array]]:
        """The module that holds the LM head's weights and ``apply(module, x)``, its map from
        hidden states [..., H] to logits [..., vocab]."""
        raise NotImplementedError

    def lm_logits(self, x: Array) -> Array:
        """The LM head: hidden states [..., H] -> float32 logits [..., vocab]."""
        module, apply = self.head_parts()
        return apply(module, x).astype(jnp.float32)

    def lm_head_fn(self) -> tuple[Callable[[Any, Array], Array], Any]:
        """The LM head as a pure function of its parameters: ``(head, params)`` with
        ``head(params, x)`` the logits in the compute dtype (``lm_logits(x)`` before its
        float32 cast), for the chunked loss (``sft_jax.lm_loss``), which differentiates it with
        respect to ``params`` itself."""
        module, apply = self.head_parts()
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def head(p: Any, x: Array) -> Array:
            return apply(nnx.merge(graphdef, p, rest), x)

        return head, params

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        dropout_rng: Array | None = None,
        cache: KVCache | None = None,
    ):
        """Next-token logits for a batch.

        Args:
            input_ids: int [B, T].
            attention_mask: [B, T] 1 for real tokens, 0 for (left or right) padding.
            segment_ids: [B, T] packed-sequence ids (0 = padding): no attention across
                segments, positions restart per segment. Not with ``cache``.
            positions: int [B, T]; default counts real tokens (see ``causal_lm_inputs``).
            dropout_rng: PRNG key; dropout is active iff given.
            cache: A ``KVCache`` to append to (from ``init_cache``), or None.

        Returns:
            logits [B, T, vocab] float32; with ``cache``, ``(logits, new_cache)``.
        """
        x, new_cache = self.backbone()(
            input_ids, attention_mask, segment_ids=segment_ids, positions=positions,
            dropout_rng=dropout_rng, cache=cache,
        )  # fmt: skip
        logits = self.lm_logits(x)  # [B, T, V]
        return logits if cache is None else (logits, new_cache)

    def hidden_states(
        self, input_ids: Array, attention_mask: Array | None = None, **inputs
    ) -> Array:
        """The final hidden states [B, T, H] that ``lm_logits`` maps to logits: ``__call__``'s
        arguments (``segment_ids``, ``positions``, ``dropout_rng``), no cache. The chunked loss
        (``sft_jax.lm_loss``) starts from them."""
        return self.backbone()(input_ids, attention_mask, **inputs)[0]
