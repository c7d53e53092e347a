"""BERT-family encoder (BERT, MiniLM, ...) in Flax NNX, named like Hugging Face's modules.

Attribute paths mirror ``transformers`` (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query``, ``pooler.dense``, ``classifier``) so the import table
in ``sft_jax.hf.bert`` only renames leaves (weight -> kernel/embedding/scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models import attention, dropout, layers, remat
from sft_jax.models.config_base import HFConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig(HFConfig):
    """BERT hyperparameters, with Hugging Face ``BertConfig`` field names.

    ``dtype`` (compute) and ``param_dtype`` (storage) are ours, not part of the HF config.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        layers.get_activation(self.hidden_act)  # fail early on an unknown activation
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(
                f"position_embedding_type={self.position_embedding_type!r}; only 'absolute'"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        self._normalize_dtypes()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        Args:
            d: The parsed ``config.json``.
            **overrides: Field values that win over ``d`` (e.g. ``dtype="bfloat16"``).
        """
        return cls(**{**cls.hf_kwargs(d), **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """Returns the Hugging Face config fields (``model_type`` included, dtypes excluded)."""
        return {"model_type": "bert", **self.hf_fields()}

    @classmethod
    def minilm_l6(cls, **overrides: Any) -> BertConfig:
        """all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, ~22.7M params."""
        return cls(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, **overrides)

    @classmethod
    def bert_base(cls, **overrides: Any) -> BertConfig:
        """bert-base-uncased: 12 layers, hidden 768, 12 heads, ~109.5M params."""
        return cls(**overrides)


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, rngs=rngs,
    )  # fmt: skip


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.hidden_dropout_prob

        def embed(n: int, names) -> layers.Embed:
            init = nnx.initializers.normal(cfg.initializer_range)
            return layers.Embed(
                n, cfg.hidden_size, names=names, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, embedding_init=init, rngs=rngs,
            )  # fmt: skip

        self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"))
        # Small tables: never shard their rows.
        self.position_embeddings = embed(cfg.max_position_embeddings, (None, "embed"))
        self.token_type_embeddings = embed(cfg.type_vocab_size, (None, "embed"))
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, input_ids: Array, token_type_ids: Array, dropout_rng=None) -> Array:
        """int [B, T] ids and type ids -> [B, T, H].

        Raises:
            ValueError: T exceeds ``max_position_embeddings`` (checked at trace time: shapes
                are static, and the lookup would otherwise reuse the last position's row).
        """
        t = input_ids.shape[1]
        limit = self.position_embeddings.embedding.shape[0]  # max_position_embeddings
        if t > limit:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings={limit}; truncate the "
                f"inputs to at most {limit} tokens"
            )
        x = self.word_embeddings(input_ids)  # [B, T, H]
        x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(jnp.arange(t))[None]  # [1, T, H]
        return dropout.dropout(self.LayerNorm(x), self.dropout_rate, dropout_rng)


class BertSelfOutput(nnx.Module):
    """Dense + dropout + residual + LayerNorm (used after attention and after the MLP)."""

    def __init__(self, cfg: BertConfig, n_in: int, names, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.hidden_dropout_prob
        self.dense = layers.config_dense(cfg, n_in, cfg.hidden_size, names, rngs)
        self.LayerNorm = _layer_norm(cfg, rngs)

    def __call__(self, h: Array, residual: Array, dropout_rng=None) -> Array:
        """[B, T, n_in], residual [B, T, H] -> [B, T, H]."""
        h = dropout.dropout(self.dense(h), self.dropout_rate, dropout_rng)
        return self.LayerNorm(h + residual)


class BertAttention(nnx.Module):
    """``self`` (q/k/v + attention) followed by ``output`` (dense + residual + LayerNorm)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dropout_rate = cfg.attention_probs_dropout_prob
        # Named ``self`` to match Hugging Face's ``attention.self.query`` paths.
        self.self = attention.SelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, out_proj=False,
            kernel_init=nnx.initializers.normal(cfg.initializer_range), dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs,
        )  # fmt: skip
        self.output = BertSelfOutput(cfg, cfg.hidden_size, ("heads", "embed"), rngs=rngs)

    def __call__(self, x: Array, mask: Array | None, dropout_rng=None) -> Array:
        """[B, T, H] -> [B, T, H]."""
        rng_probs, rng_out = dropout.split_rng(dropout_rng, 2)
        h = self.self(x, mask, dropout_rate=self.dropout_rate, dropout_rng=rng_probs)
        return self.output(h, x, rng_out)


class BertIntermediate(nnx.Module):
    """Dense [H -> intermediate] + activation."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        self.dense = layers.config_dense(
            cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs
        )

    def __call__(self, x: Array) -> Array:
        """[B, T, H] -> [B, T, I]."""
        return layers.get_activation(self.hidden_act)(self.dense(x))


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block: attention, then the MLP."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: Array, mask: Array | None, dropout_rng=None) -> Array:
        """[B, T, H] -> [B, T, H]."""
        rng_attn, rng_out = dropout.split_rng(dropout_rng, 2)
        x = self.attention(x, mask, rng_attn)
        return self.output(self.intermediate(x), x, rng_out)


class BertEncoder(nnx.Module):
    """The stack of ``BertLayer``s, in ``layer`` (an ``nnx.List``)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: Array, mask: Array | None, dropout_rng=None) -> Array:
        """[B, T, H] -> [B, T, H]; layer i gets dropout key fold_in(dropout_rng, i)."""
        return remat.run_encoder(self.layer, x, mask, dropout_rng=dropout_rng)


class BertPooler(nnx.Module):
    """tanh(Dense(hidden state of the first token, [CLS]))."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = layers.config_dense(
            cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs
        )

    def __call__(self, x: Array) -> Array:
        """[B, T, H] -> [B, H]."""
        return jnp.tanh(self.dense(x[:, 0]))


class BertModel(nnx.Module):
    """BERT encoder: embeddings, encoder stack and (optionally) the pooler.

    Args:
        config: Model hyperparameters.
        add_pooling_layer: Build ``pooler`` (the pooled output is None without it).
        rngs: RNG streams for initialization.
    """

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = BertPooler(config, rngs=rngs) if add_pooling_layer else None

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        dropout_rng: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """Encodes a batch.

        Args:
            input_ids: int [B, T].
            attention_mask: [B, T] 1 for real tokens, 0 for padding; None means all ones.
            token_type_ids: int [B, T]; None means zeros.
            dropout_rng: PRNG key; dropout is active iff given.

        Returns:
            (sequence_output [B, T, H], pooled [B, H] or None without a pooler).
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:
            dense = attention.make_attention_mask(input_ids.shape[1], padding_mask=attention_mask)
            # The padding as one segment per row too, for cuDNN's sequence lengths
            # (runtime.attention='cudnn_packed'); real tokens attend to the same keys.
            mask = attention.AttentionMask(dense, segment_ids=attention_mask.astype(jnp.int32))
        rng_emb, rng_enc = dropout.split_rng(dropout_rng, 2)
        x = self.embeddings(input_ids, token_type_ids, rng_emb)  # [B, T, H]
        x = self.encoder(x, mask, rng_enc)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled


class BertForSequenceClassification(nnx.Module):
    """BERT + dropout + ``classifier`` Dense on the pooled output (as Hugging Face's).

    Args:
        config: Model hyperparameters.
        num_labels: Number of classes.
        rngs: RNG streams for initialization.
        classifier_dropout: Dropout before the head; default ``config.classifier_dropout``,
            else ``config.hidden_dropout_prob``.
        label_names: Optional class names (kept for export).
    """

    def __init__(
        self,
        config: BertConfig,
        num_labels: int,
        *,
        rngs: nnx.Rngs,
        classifier_dropout: float | None = None,
        label_names: tuple[str, ...] | None = None,
    ):
        if classifier_dropout is None:
            classifier_dropout = config.classifier_dropout
        if classifier_dropout is None:
            classifier_dropout = config.hidden_dropout_prob
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        self.config = config
        self.num_labels = int(num_labels)
        self.label_names = None if label_names is None else tuple(label_names)
        self.classifier_dropout = float(classifier_dropout)
        self.bert = BertModel(config, rngs=rngs)
        self.classifier = layers.config_dense(
            config, config.hidden_size, self.num_labels, ("embed", None), rngs
        )

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        dropout_rng: Array | None = None,
    ) -> Array:
        """Classifies a batch: int [B, T] -> logits [B, num_labels] float32.

        Args:
            input_ids: int [B, T].
            attention_mask: [B, T] 1/0; None means all ones.
            token_type_ids: int [B, T]; None means zeros.
            dropout_rng: PRNG key; dropout is active iff given.
        """
        rng_bert, rng_head = dropout.split_rng(dropout_rng, 2)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, dropout_rng=rng_bert)
        pooled = dropout.dropout(pooled, self.classifier_dropout, rng_head)  # [B, H]
        return self.classifier(pooled).astype(jnp.float32)
