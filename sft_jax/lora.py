"""Low-rank adapters (LoRA, Hu et al. 2021) for the ``layers.Dense`` projections of any model.

``apply_lora`` swaps matching ``Dense`` modules, in place, for ``LoRADense``: the same ``kernel``
and ``bias`` Params at the same paths (``model/layers/0/self_attn/q_proj/kernel``) plus
``lora_a`` [in, r] and ``lora_b`` [r, out] next to them, so

    y = x @ kernel + bias + (dropout(x) @ lora_a @ lora_b) * alpha / r.

``lora_b`` starts at zero (an untrained adapter changes nothing) and ``lora_a`` as PEFT's
``kaiming_uniform_(a=sqrt(5))``: uniform(-1/sqrt(in), 1/sqrt(in)). The freezing preset ``"lora"``
trains only the ``lora_a``/``lora_b`` leaves (``is_lora_param``), so the optimizer keeps state for
them alone. ``merge_lora`` folds the adapters into the kernels and restores plain ``Dense``
modules: the parameter tree is the base model's again and the Hugging Face exporters apply.

Adapter dropout needs a key that ``Dense`` call sites do not pass: each ``LoRADense`` reads the
ambient one (``dropout.dropout_scope``, opened by the tasks) folded with a salt fixed per layer.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sft_jax import freezing
from sft_jax.models import dropout, layers

Array = jax.Array

# Projection names of the Llama family (q/k/v/o, gate/up/down) and GPT-2 (c_attn, c_proj, c_fc).
# One pattern, so that it matches in either family (apply_lora requires every pattern to match).
DEFAULT_TARGETS: tuple[str, ...] = (
    # Every attention and MLP projection: Llama / Qwen2 (q_proj ... down_proj), GPT-2 (c_*),
    # BERT and ViT (query/key/value, attention/output/dense, intermediate/dense, output/dense).
    r"(^|/)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc"
    r"|query|key|value|((attention/)?output|intermediate)/dense)$",
)
# Parameter paths of adapter weights (``.../q_proj/lora_a``); the ``"lora"`` freezing preset.
LORA_PARAM_PATTERN = freezing.LORA_PATTERN
_LORA_PARAM = re.compile(LORA_PARAM_PATTERN)

# PEFT's kaiming_uniform_(a=sqrt(5)) on a fan-in of `in`: bound sqrt(6 / (1 + 5) / in).
lora_a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def is_lora_param(path: str) -> bool:
    """Whether a ``/``-joined parameter path names an adapter weight (``lora_a``/``lora_b``)."""
    return _LORA_PARAM.search(path) is not None


class LoRADense(layers.Dense):
    """A ``Dense`` with a low-rank update: ``x @ kernel + bias + (drop(x) @ A @ B) * alpha / r``.

    Holds the wrapped layer's own ``kernel``/``bias`` Params (same objects, same attribute names).

    Args:
        base: The layer to adapt; its Params are shared, not copied.
        rank: Adapter rank r >= 1.
        alpha: Scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: Dropout rate on the adapter's input (active inside a ``dropout.dropout_scope``
            with a key).
        salt: Folded into the ambient dropout key so that every adapter draws its own mask.
        param_dtype: Storage dtype of ``lora_a``/``lora_b`` (default float32 whatever the
            kernel's: bfloat16 adapters lose the small early updates to rounding; PEFT also
            keeps adapters in float32).
        rngs: RNG streams for ``lora_a``'s initialization.
    """

    def __init__(
        self,
        base: layers.Dense,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        salt: int = 0,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.dtype = base.dtype
        self.kernel = base.kernel
        self.bias = base.bias
        self.rank, self.scale = int(rank), float(alpha) / rank
        self.dropout, self.salt = float(dropout), int(salt)
        n_in, n_out = base.kernel.shape
        names_in, names_out = base.kernel.get_metadata()["out_sharding"]
        dtype = jnp.float32 if param_dtype is None else param_dtype
        self.lora_a = layers.make_param(rngs, lora_a_init, (n_in, rank), (names_in, None), dtype)
        self.lora_b = layers.make_param(
            rngs, nnx.initializers.zeros, (rank, n_out), (None, names_out), dtype
        )

    def __call__(self, x: Array) -> Array:
        """Applies base layer and adapter: [..., in] -> [..., out]."""
        y = super().__call__(x)  # [..., out]
        h = dropout.dropout(x.astype(self.dtype), self.dropout, self._dropout_rng())
        h = jnp.dot(h, self.lora_a[...].astype(self.dtype))  # [..., r]
        h = jnp.dot(h, self.lora_b[...].astype(self.dtype))  # [..., out]
        return y + h * jnp.asarray(self.scale, self.dtype)

    def _dropout_rng(self) -> Array | None:
        return dropout.scoped_rng(self.salt) if self.dropout > 0.0 else None

    def merged_kernel(self) -> Array:
        """``kernel + scale * lora_a @ lora_b`` in float32, cast to the kernel's dtype."""
        a = self.lora_a[...].astype(jnp.float32)  # [in, r]
        b = self.lora_b[...].astype(jnp.float32)  # [r, out]
        kernel = self.kernel[...]
        return (kernel.astype(jnp.float32) + self.scale * (a @ b)).astype(kernel.dtype)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def _set_child(model: nnx.Module, path: tuple[Any, ...], child: nnx.Module) -> None:
    """Replaces the submodule at ``path`` (attribute names and list indices) by ``child``."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def _dense_modules(model: nnx.Module) -> list[tuple[tuple[Any, ...], layers.Dense]]:
    """Every ``Dense`` (LoRA ones included) with its path, collected before any edit."""
    return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, layers.Dense)]


def _match(model: nnx.Module, targets: Sequence[str]) -> list[tuple[tuple[Any, ...], layers.Dense]]:
    """The ``(path, Dense)`` pairs whose path matches a target; every target must match."""
    patterns = [re.compile(t) for t in targets]
    if not patterns:
        raise ValueError("LoRA needs at least one target pattern")
    dense = _dense_modules(model)
    matched, used = [], [False] * len(patterns)
    for path, module in dense:
        hits = [i for i, p in enumerate(patterns) if p.search(_path_str(path))]
        for i in hits:
            used[i] = True
        if hits and isinstance(module, LoRADense):
            raise ValueError(f"{_path_str(path)} already has a LoRA adapter (targets {targets})")
        if hits:
            matched.append((path, module))
    unused = [t for t, u in zip(targets, used) if not u]
    if unused:
        names = [_path_str(p) for p, _ in dense]
        raise ValueError(f"LoRA targets matched no Dense layer: {unused}; Dense layers: {names}")
    return matched


def _salt(path: str) -> int:
    """A per-layer dropout salt that depends only on the layer's path (31 bits)."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float = 0.0,
    seed: int = 0,
    param_dtype: Any = None,
) -> int:
    """Wraps, in place, every ``Dense`` whose path matches a target regex in a ``LoRADense``.

    Args:
        model: Any NNX model built from ``layers.Dense``.
        rank: Adapter rank r >= 1.
        alpha: The update is scaled by ``alpha / rank``.
        targets: Regexes searched (``re.search``) in module paths such as
            ``model/layers/3/self_attn/q_proj``.
        dropout: Adapter input dropout rate.
        seed: Seeds the ``lora_a`` initialization.
        param_dtype: Storage dtype of the adapter weights (default float32).

    Returns:
        The number of wrapped layers.

    Raises:
        ValueError: rank < 1, no targets, a target matching no ``Dense``, or a match that already
            carries an adapter.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    matched = _match(model, targets)
    rngs = nnx.Rngs(seed)
    for path, dense in matched:
        adapted = LoRADense(
            dense, rank=rank, alpha=alpha, dropout=dropout, salt=_salt(_path_str(path)),
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        _set_child(model, path, adapted)
    return len(matched)


def apply_lora_for_policy(
    model: nnx.Module, policy: Any, lora_cfg: ml_collections.ConfigDict | None, seed: int
) -> nnx.Module:
    """Inserts the adapters a ``lora:R`` freezing policy trains (rank R; ``alpha``, ``dropout``
    and ``targets`` from the ``lora`` block when the config has one, else alpha = 2R, no
    dropout, ``DEFAULT_TARGETS``). Other policies: the ``lora`` block alone decides."""
    rank = freezing.lora_rank(policy)
    if rank is None:
        return model if lora_cfg is None else apply_lora_from_config(model, lora_cfg)
    if lora_cfg is not None and lora_cfg.rank not in (0, rank):
        raise ValueError(
            f"freeze.policy={policy!r} asks for rank {rank} but lora.rank={lora_cfg.rank}; "
            "set one of them"
        )
    apply_lora(
        model,
        rank=rank,
        alpha=lora_cfg.alpha if lora_cfg is not None else 2.0 * rank,
        targets=(tuple(lora_cfg.targets) if lora_cfg is not None else ()) or DEFAULT_TARGETS,
        dropout=lora_cfg.dropout if lora_cfg is not None else 0.0,
        seed=seed,
    )
    return model


def apply_lora_from_config(model: nnx.Module, lora_cfg: ml_collections.ConfigDict) -> nnx.Module:
    """Applies the ``lora`` config block: ``rank`` (0 = off), ``alpha``, ``dropout``, ``targets``
    (empty = ``DEFAULT_TARGETS``) and an optional ``seed``. Returns the (same) model."""
    if lora_cfg.rank == 0:
        return model
    apply_lora(
        model,
        rank=lora_cfg.rank,
        alpha=lora_cfg.alpha,
        targets=tuple(lora_cfg.targets) or DEFAULT_TARGETS,
        dropout=lora_cfg.dropout,
        seed=lora_cfg.get("seed", 0),
    )
    return model


def _plain_dense(layer: LoRADense) -> layers.Dense:
    """A ``Dense`` holding ``layer``'s kernel Param (set to the merged kernel) and bias."""
    n_in, n_out = layer.kernel.shape
    # Built abstractly (nothing allocated); both Params are then replaced by the real ones.
    dense = nnx.eval_shape(
        lambda: layers.Dense(
            n_in, n_out, use_bias=layer.bias is not None, dtype=layer.dtype, rngs=nnx.Rngs(0)
        )
    )
    layer.kernel.set_value(layer.merged_kernel())
    dense.kernel, dense.bias = layer.kernel, layer.bias
    return dense


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel, in place, and restores plain ``Dense`` modules.

    Afterwards the model has exactly the base model's parameter tree (for export). Returns it.
    """
    for path, dense in _dense_modules(model):
        if isinstance(dense, LoRADense):
            _set_child(model, path, _plain_dense(dense))
    return model
