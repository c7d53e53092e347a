"""A tiny classifier with the classification calling contract, for step/sharding tests that
should not depend on a model family."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

flax.config.update("flax_always_shard_variable", False)


class ToyClassifier(nnx.Module):
    """Embedding bag -> Dense -> dropout -> classifier, params with logical axis names."""

    def __init__(
        self,
        vocab: int = 50,
        hidden: int = 16,
        num_labels: int = 3,
        *,
        seed: int = 0,
        dropout: float = 0.1,
    ):
        self.dropout = dropout
        rngs = nnx.Rngs(seed)
        init = nnx.initializers.normal(0.5)
        self.embeddings = nnx.Embed(
            vocab, hidden, embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs
        )
        self.dense = nnx.Linear(
            hidden, hidden, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs
        )
        self.classifier = nnx.Linear(
            hidden, num_labels, kernel_init=nnx.with_partitioning(init, ("mlp", None)), rngs=rngs
        )

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_rng=None):
        del token_type_ids
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.embeddings(input_ids) * mask[..., None]
        h = h.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
        h = jnp.tanh(self.dense(h))
        if dropout_rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1 - self.dropout), 0.0)
        return self.classifier(h)


def toy_batch(n: int = 16, t: int = 8, vocab: int = 50, k: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, t)).astype(np.int32)
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    labels = (ids[:, 0] % k).astype(np.int32)  # learnable from the first token
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "labels": labels,
        "example_mask": np.ones(n, np.float32),
    }
