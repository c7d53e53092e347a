"""The kernel choices read while a step is traced, as one value (config ``runtime.*``, the
benchmark's flags; ``sft_jax.runtime`` describes each).

Each choice is a ``trace_setting.TraceSetting`` of the module that uses it. ``Kernels.set`` sets
all of them for the rest of the current context (a command-line entry point's main thread),
``Kernels.scope`` for a block (one benchmark measurement, a spawned process's run).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from sft_jax import lm_loss
from sft_jax.models import attention, cudnn_attention, dropout, remat


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Attributes:
    attention: ``xla`` | ``cudnn`` | ``cudnn_packed`` (``attention.attention_implementation``).
    dropout: ``threefry`` | ``hash`` (``dropout.dropout_implementation``).
    loss_chunk: Causal LM loss positions per chunk, 0 = whole sequence (``lm_loss``).
    packed_max_segments: Segments per row ``cudnn_packed`` describes (``cudnn_attention``).
    remat: ``none`` | ``full``: what the backward pass keeps of each block (``remat``).
    """

    attention: str = "xla"
    dropout: str = "threefry"
    loss_chunk: int = 0
    packed_max_segments: int = cudnn_attention.PACKED_MAX_SEGMENTS
    remat: str = "none"

    @classmethod
    def from_config(cls, get: Callable[[str, Any], Any]) -> Kernels:
        """The choices from ``get(key, default)`` (a config block's ``get``)."""
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})

    def _settings(self) -> tuple[tuple[Callable, Callable, Any], ...]:
        """(set, scope, value) of each choice."""
        return (
            (attention.set_attention, attention.attention_implementation, self.attention),
            (dropout.set_dropout, dropout.dropout_implementation, self.dropout),
            (lm_loss.set_loss_chunk, lm_loss.loss_chunk_scope, self.loss_chunk),
            (cudnn_attention.MAX_SEGMENTS.set, cudnn_attention.MAX_SEGMENTS.scope,
             self.packed_max_segments),
            (remat.REMAT.set, remat.REMAT.scope, self.remat),
        )  # fmt: skip

    def set(self) -> None:
        """Sets every choice for the rest of the current context."""
        for set_, _, value in self._settings():
            set_(value)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Every choice while the block runs; the previous ones after it."""
        with contextlib.ExitStack() as stack:
            for _, scope, value in self._settings():
                stack.enter_context(scope(value))
            yield

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
