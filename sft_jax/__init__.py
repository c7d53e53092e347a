"""sft_jax: supervised fine-tuning of pretrained models in JAX (Flax NNX, Optax, Orbax).

The public API is imported lazily so that ``import sft_jax`` stays cheap (no JAX/Flax import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sft_jax.pretrained import load_pretrained, resolve_model_dir  # noqa: F401

# Public name -> module that defines it.
_LAZY = {
    "load_pretrained": "sft_jax.pretrained",
    "resolve_model_dir": "sft_jax.pretrained",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip this hook
        return value
    raise AttributeError(f"module 'sft_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
