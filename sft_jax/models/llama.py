"""Llama-family decoder LMs (Llama 2/3, SmolLM2, Qwen2) in Flax NNX, named like Hugging Face's.

Attribute paths mirror ``transformers`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj``, ``model.layers.{i}.mlp.gate_proj``, ``model.norm``,
``lm_head``) so the import table in ``sft_jax.hf.llama`` only renames leaves. Qwen2 is the same
network with biases on the q/k/v projections (``model_type="qwen2"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from sft_jax.models import attention, decoder, layers
from sft_jax.models.config_base import HFConfig

Array = jax.Array
MODEL_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(HFConfig):
    """Llama / Qwen2 hyperparameters, with Hugging Face config field names.

    ``rope_scaling`` is None or a dict with ``rope_type`` ``linear`` or ``llama3`` (stored as a
    sorted tuple of items so the config stays hashable; ``rope_scaling_dict`` gives the dict).
    ``attention_bias`` is Llama's flag (bias on q/k/v/o); Qwen2 always has q/k/v biases and no
    o bias. ``dtype`` (compute) and ``param_dtype`` (storage) are ours.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r}; supported: {MODEL_TYPES}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r}: Llama models use 'silu'")
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        decoder.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)  # validate
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        self._normalize_dtypes()

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """``rope_scaling`` as a dict (None without scaling)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections have biases (Qwen2 always)."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        """Whether the output projection has a bias (Llama's ``attention_bias`` only)."""
        return self.attention_bias and self.model_type == "llama"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        Reads both the transformers 4 (``rope_theta`` + ``rope_scaling``) and the transformers 5
        (``rope_parameters``) spelling of RoPE settings.

        Raises:
            NotImplementedError: Qwen2 sliding-window attention.
        """
        if d.get("use_sliding_window"):
            raise NotImplementedError("Qwen2 sliding-window attention is not supported")
        kwargs = cls.hf_kwargs(d)
        rope = dict(d.get("rope_parameters") or {})
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            kwargs["rope_scaling"] = rope
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = {
                k: v for k, v in kwargs["rope_scaling"].items() if k != "rope_theta"
            }
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """Hugging Face config fields (``model_type``, ``architectures`` included; no dtypes)."""
        d = self.hf_fields()
        d["rope_scaling"] = self.rope_scaling_dict
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.pop("mlp_bias")
        return {**d, "architectures": [arch]}

    @classmethod
    def smollm2_135m(cls, **overrides: Any) -> LlamaConfig:
        """SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, tied, ~134.5M params."""
        kw = dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
            rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        )  # fmt: skip
        return cls(**{**kw, **overrides})

    @classmethod
    def qwen2_5_0_5b(cls, **overrides: Any) -> LlamaConfig:
        """Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, tied, ~494M params."""
        kw = dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
            bos_token_id=151643, eos_token_id=151643, model_type="qwen2",
        )  # fmt: skip
        return cls(**{**kw, **overrides})


def _rms_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> layers.RMSNorm:
    return layers.RMSNorm(
        cfg.hidden_size, epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        rngs=rngs,
    )  # fmt: skip


class LlamaAttention(nnx.Module):
    """GQA self-attention with RoPE: ``q_proj``/``k_proj``/``v_proj``/``o_proj``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.dropout_rate = cfg.head_dim, cfg.attention_dropout
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, bias = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = layers.config_dense(cfg, h, q_size, ("embed", "heads"), rngs, bias)
        self.k_proj = layers.config_dense(cfg, h, kv_size, ("embed", "kv"), rngs, bias)
        self.v_proj = layers.config_dense(cfg, h, kv_size, ("embed", "kv"), rngs, bias)
        self.o_proj = layers.config_dense(cfg, q_size, h, ("heads", "embed"), rngs, cfg.o_bias)

    def __call__(self, x: Array, rope, mask, kv=None, index=None, dropout_rng=None):
        """[B, T, H] -> ([B, T, H], updated (k, v) cache [B, S, K, D] or None).

        Args:
            x: Hidden states [B, T, H].
            rope: (cos, sin) [B, T, D].
            mask: From ``decoder.causal_lm_inputs`` (an ``AttentionMask``; S = T without a cache).
            kv: This layer's (keys, values) cache [B, S, K, D], or None.
            index: Cache slot of the first new token.
            dropout_rng: Attention-dropout key.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, D]
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, D]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = decoder.apply_rope(q, *rope), decoder.apply_rope(k, *rope)
        if kv is not None:
            k, v = kv = decoder.write_kv(*kv, k, v, index)  # [B, S, K, D]
        y = attention.dot_product_attention(
            q, k, v, mask, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng
        )
        return self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim)), kv


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = layers.config_dense(cfg, h, i, ("embed", "mlp"), rngs, bias)
        self.up_proj = layers.config_dense(cfg, h, i, ("embed", "mlp"), rngs, bias)
        self.down_proj = layers.config_dense(cfg, i, h, ("mlp", "embed"), rngs, bias)

    def __call__(self, x: Array) -> Array:
        """[B, T, H] -> [B, T, H]."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))  # via [B, T, I]


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(cfg, rngs)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = _rms_norm(cfg, rngs)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, index=None, dropout_rng=None):
        """[B, T, H] -> ([B, T, H], updated layer cache or None)."""
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, index, dropout_rng)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nnx.Module):
    """Embeddings, the decoder stack (``layers``, an ``nnx.List``) and the final ``norm``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = layers.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
        )  # fmt: skip
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = _rms_norm(cfg, rngs)

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
        """int [B, T] -> (hidden states [B, T, H], new cache or None); see ``LlamaForCausalLM``."""
        cfg = self.config
        b, t = input_ids.shape
        mask, positions, cache_mask = decoder.causal_lm_inputs(
            b, t, attention_mask, segment_ids, positions, cache
        )
        inv_freq = decoder.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        rope = decoder.rope_cos_sin(positions, inv_freq)  # 2 x [B, T, D]
        x = self.embed_tokens(input_ids)  # [B, T, H]
        x, cache = decoder.run_blocks(
            self.layers, x, mask, cache, cache_mask, dropout_rng,
            lambda block, x, mask, kv, index, rng: block(x, rope, mask, kv, index, rng),
        )  # fmt: skip
        return self.norm(x), cache


class LlamaForCausalLM(decoder.CausalLM, nnx.Module):
    """Llama / Qwen2 decoder with an LM head (``lm_head``, or the tied embedding's ``attend``).

    Args:
        config: Model hyperparameters.
        rngs: RNG streams for initialization.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        # Tied embeddings reuse ``model.embed_tokens.attend``: no shared Variable.
        h, v = config.hidden_size, config.vocab_size
        tied = config.tie_word_embeddings
        self.lm_head = (
            None if tied else layers.config_dense(config, h, v, ("embed", "vocab"), rngs, False)
        )

    def init_cache(self, batch: int, max_len: int) -> decoder.KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens."""
        cfg = self.config
        return decoder.KVCache.create(
            cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
            cfg.dtype,
        )  # fmt: skip

    def backbone(self) -> Any:
        """The block stack (``decoder.CausalLM``)."""
        return self.model

    def head_parts(self) -> tuple[Any, Any]:
        """The LM head (``decoder.CausalLM``): the untied ``lm_head``, or the embedding table."""
        if self.lm_head is None:
            return self.model.embed_tokens, lambda embed, x: embed.attend(x)
        return self.lm_head, lambda dense, x: dense(x)
