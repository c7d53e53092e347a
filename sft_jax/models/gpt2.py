"""GPT-2 in Flax NNX, named like Hugging Face's ``GPT2LMHeadModel``.

Attribute paths mirror ``transformers`` (``transformer.wte``, ``transformer.h.{i}.attn.c_attn``,
``transformer.ln_f``); the LM head is always the tied token embedding (``wte.attend``). HF's
``Conv1D`` stores weights [in, out], which is our ``Dense`` kernel layout already.

One layout differs: the fused ``c_attn`` projection's 3E output columns are ordered head by head,
[N heads, (q, k, v), D] (Megatron's fused QKV order), where HF's are [(q, k, v), N, D]. Split
over tensor-parallel devices, each device's columns are then whole heads' q, k and v, and
attention needs no activations from another device (HF's order would give device 0 only query
columns). ``sft_jax.hf.gpt2`` reorders on import and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import attention, decoder, dropout, layers
from sft_jax.models.config_base import HFConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPT2Config(HFConfig):
    """GPT-2 hyperparameters, with Hugging Face ``GPT2Config`` field names (plus our dtypes)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # same math in float32; accepted and ignored
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        layers.get_activation(self.activation_function)  # fail early on an unknown activation
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not self.tie_word_embeddings:
            raise NotImplementedError("GPT-2 with an untied LM head is not supported")
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        self._normalize_dtypes()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> GPT2Config:
        """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        Raises:
            NotImplementedError: Cross-attention (``add_cross_attention``) checkpoints.
        """
        if d.get("add_cross_attention"):
            raise NotImplementedError("GPT-2 with cross-attention is not supported")
        return cls(**{**cls.hf_kwargs(d), **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """Hugging Face config fields (``model_type``, ``architectures`` included; no dtypes)."""
        return {**self.hf_fields(), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}

    @classmethod
    def gpt2_small(cls, **overrides: Any) -> GPT2Config:
        """``gpt2``: 12 layers, hidden 768, 12 heads, ~124.4M params."""
        return cls(**overrides)


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(
        cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, rngs=rngs,
    )  # fmt: skip


class GPT2Attention(nnx.Module):
    """Causal self-attention with fused ``c_attn`` ([E, 3E], columns [N, (q, k, v), D]) and
    ``c_proj``."""

    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        e = cfg.n_embd
        self.num_heads, self.head_dim = cfg.n_head, e // cfg.n_head
        self.attn_pdrop, self.resid_pdrop = cfg.attn_pdrop, cfg.resid_pdrop
        # dot_product_attention scales by D**-0.5; fold HF's other scalings into q.
        scale = 1.0 if cfg.scale_attn_weights else self.head_dim**0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.q_scale = scale
        self.c_attn = layers.config_dense(cfg, e, 3 * e, ("embed", "heads"), rngs)
        self.c_proj = layers.config_dense(cfg, e, e, ("heads", "embed"), rngs)

    def __call__(self, x, mask, kv=None, index=None, dropout_rng=None):
        """[B, T, E] -> ([B, T, E], updated (k, v) cache [B, S, N, D] or None)."""
        b, t, e = x.shape
        rng_probs, rng_out = dropout.split_rng(dropout_rng, 2)
        qkv = self.c_attn(x).reshape(b, t, self.num_heads, 3, self.head_dim)  # head by head
        q, k, v = (qkv[..., i, :] for i in range(3))  # 3 x [B, T, N, D]
        if self.q_scale != 1.0:
            q = q * jnp.asarray(self.q_scale, q.dtype)
        if kv is not None:
            k, v = kv = decoder.write_kv(*kv, k, v, index)  # [B, S, N, D]
        y = attention.dot_product_attention(
            q, k, v, mask, dropout_rate=self.attn_pdrop, dropout_rng=rng_probs
        ).reshape(b, t, e)
        return dropout.dropout(self.c_proj(y), self.resid_pdrop, rng_out), kv


class GPT2MLP(nnx.Module):
    """``c_proj(act(c_fc(x)))`` with residual dropout."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.act, self.resid_pdrop = cfg.activation_function, cfg.resid_pdrop
        self.c_fc = layers.config_dense(cfg, cfg.n_embd, cfg.n_inner, ("embed", "mlp"), rngs)
        self.c_proj = layers.config_dense(cfg, cfg.n_inner, cfg.n_embd, ("mlp", "embed"), rngs)

    def __call__(self, x: Array, dropout_rng=None) -> Array:
        """[B, T, E] -> [B, T, E]."""
        h = layers.get_activation(self.act)(self.c_fc(x))  # [B, T, I]
        return dropout.dropout(self.c_proj(h), self.resid_pdrop, dropout_rng)


class GPT2Block(nnx.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = GPT2Attention(cfg, layer_idx, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, kv=None, index=None, dropout_rng=None):
        """[B, T, E] -> ([B, T, E], updated layer cache or None)."""
        rng_attn, rng_mlp = dropout.split_rng(dropout_rng, 2)
        h, kv = self.attn(self.ln_1(x), mask, kv, index, rng_attn)
        x = x + h
        return x + self.mlp(self.ln_2(x), rng_mlp), kv


class GPT2Model(nnx.Module):
    """Token + learned position embeddings, the blocks (``h``) and the final ``ln_f``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg

        def embed(n: int, names) -> layers.Embed:
            return layers.Embed(
                n, cfg.n_embd, names=names, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
            )  # fmt: skip

        self.wte = embed(cfg.vocab_size, ("vocab", "embed"))
        self.wpe = embed(cfg.n_positions, (None, "embed"))
        self.h = nnx.List([GPT2Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)

    def _check_length(self, t: int, cache: decoder.KVCache | None) -> None:
        """Learned positions stop at ``n_positions``; past it the lookup would silently reuse
        the last row. Shapes are static, so this runs once, at trace time. With a cache the
        positions continue the cached tokens and stay below its slot count S, so S is checked
        (``generate`` sizes it prompt + new tokens)."""
        limit = self.config.n_positions
        if t > limit:
            raise ValueError(
                f"sequence length {t} exceeds the model's n_positions={limit}; truncate the "
                f"inputs to at most {limit} tokens"
            )
        slots = None if cache is None else cache.mask.shape[1]
        if slots is not None and slots > limit:
            raise ValueError(
                f"a KV cache of {slots} slots exceeds the model's n_positions={limit}: its "
                f"positions would run past the learned table; use at most {limit} slots"
            )

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        dropout_rng: Array | None = None,
        cache: decoder.KVCache | None = None,
    ) -> tuple[Array, decoder.KVCache | None]:
        """int [B, T] -> (hidden states [B, T, E], new cache or None); see ``GPT2LMHeadModel``.

        Raises:
            ValueError: T, or the cache's slot count, exceeds ``n_positions``.
        """
        b, t = input_ids.shape
        self._check_length(t, cache)
        mask, positions, cache_mask = decoder.causal_lm_inputs(
            b, t, attention_mask, segment_ids, positions, cache
        )
        rng_emb, rng_blocks = dropout.split_rng(dropout_rng, 2)
        x = self.wte(input_ids) + self.wpe(positions)  # [B, T, E]
        x = dropout.dropout(x, self.config.embd_pdrop, rng_emb)
        x, cache = decoder.run_blocks(
            self.h, x, mask, cache, cache_mask, rng_blocks,
            lambda block, x, mask, kv, index, rng: block(x, mask, kv, index, rng),
        )  # fmt: skip
        return self.ln_f(x), cache


class GPT2LMHeadModel(decoder.CausalLM, nnx.Module):
    """GPT-2 with the tied LM head (``transformer.wte.attend``).

    Args:
        config: Model hyperparameters.
        rngs: RNG streams for initialization.
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> decoder.KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens."""
        cfg = self.config
        return decoder.KVCache.create(
            cfg.n_layer, batch, max_len, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.dtype
        )

    def backbone(self) -> Any:
        """The block stack (``decoder.CausalLM``)."""
        return self.transformer

    def head_parts(self) -> tuple[Any, Any]:
        """The tied LM head (``decoder.CausalLM``): the token embedding table."""
        return self.transformer.wte, lambda wte, x: wte.attend(x)
