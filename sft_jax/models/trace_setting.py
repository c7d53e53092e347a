"""Settings read while a function is traced: the attention kernel, the dropout-mask
implementation, the ambient dropout key, BatchNorm's mapped axis, the LM loss's chunk length,
whether blocks are recomputed in the backward pass.

Each is a context variable behind ``TraceSetting``: ``set`` changes it for the rest of the
current context (a command-line entry point's main thread), ``scope`` for a block, ``get`` reads
it. A jitted function sees the value current when it is traced (a cached trace keeps it), and
a scope opened inside the traced function holds for what is traced inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class TraceSetting(Generic[T]):
    """A context variable with a checked ``set``, a ``scope`` that restores it, and ``get``.

    Args:
        name: The variable's name (for debugging).
        default: Its value where nothing was set.
        check: Maps a value to the stored one, or raises ValueError naming what is wrong
            (default: stores it unchanged).
    """

    def __init__(self, name: str, default: T, check: Callable[[Any], T] | None = None):
        self._var: contextvars.ContextVar[T] = contextvars.ContextVar(name, default=default)
        self._check = check if check is not None else (lambda value: value)

    def get(self) -> T:
        """The current value."""
        return self._var.get()

    def set(self, value: Any) -> None:
        """Sets the value for the rest of the current context."""
        self._var.set(self._check(value))

    @contextlib.contextmanager
    def scope(self, value: Any) -> Iterator[None]:
        """Sets the value while the block runs, and restores the previous one after it (also
        when the block raises)."""
        token = self._var.set(self._check(value))
        try:
            yield
        finally:
            self._var.reset(token)


def checked_choice(kind: str, name: str, choices: tuple[str, ...]) -> str:
    """``name`` if it is one of ``choices``, else a ValueError naming the ``kind`` and choices."""
    if name not in choices:
        raise ValueError(f"{kind} implementation {name!r}; use one of {choices}")
    return name


def choice(kind: str, choices: tuple[str, ...], default: str) -> TraceSetting[str]:
    """A setting that takes one of ``choices`` (a kernel or implementation name)."""
    return TraceSetting(kind, default, lambda name: checked_choice(kind, name, choices))
