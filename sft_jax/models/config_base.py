"""What every model family's config dataclass shares: Hugging Face ``config.json`` field mapping
and the dtype fields that are ours, not Hugging Face's."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


class HFConfig:
    """Mixin for frozen config dataclasses whose field names are Hugging Face's.

    ``dtype`` / ``param_dtype`` are ours: stored as dtype names (hashable, JSON-friendly) and left
    out of ``config.json``.
    """

    _OURS = ("dtype", "param_dtype")

    def _normalize_dtypes(self) -> None:
        """Call from ``__post_init__``: dtypes become their names."""
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @classmethod
    def hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The entries of a ``config.json`` dict that are fields here (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._OURS)
        return {k: v for k, v in d.items() if k in names}

    def hf_fields(self) -> dict[str, Any]:
        """All fields except ours, for writing ``config.json``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self._OURS}  # fmt: skip
