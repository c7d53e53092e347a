"""Small pytree helpers keyed by ``/``-joined path strings."""

from __future__ import annotations

from typing import Any, Callable

import jax


def key_str(key: Any) -> str:
    """One path entry as text: dict keys, attribute names and sequence indices alike."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple) -> str:
    return "/".join(key_str(k) for k in path)


def map_with_path_str(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``jax.tree.map`` where ``fn`` receives the ``"a/b/0/kernel"`` path of each leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def flatten_to_dict(tree: Any) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}`` for every leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): x for p, x in flat}


def leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


def count(tree: Any, mask: Any | None = None) -> int:
    """Number of scalars in ``tree`` (only where ``mask`` is True when given)."""
    sizes = jax.tree.map(lambda x: int(x.size), tree)
    if mask is not None:
        sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
    return int(sum(leaves(sizes)))


def nbytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in leaves(tree) if hasattr(x, "dtype")))
