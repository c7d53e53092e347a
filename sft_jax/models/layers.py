"""Shared Flax NNX layers: Dense, Embed, LayerNorm / RMSNorm, activations (attention is in
``sft_jax.models.attention``, dropout in ``sft_jax.models.dropout``).

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
