"""Device mesh, logical-axis rules and the shardings of parameters, state and batches.

Every parameter carries logical axis names (``("embed", "mlp")``). One rules table maps each
logical name to a mesh axis; data parallel, FSDP and tensor parallel differ only by the mesh
shape (axes ``data``, ``fsdp``, ``tensor``). A dimension whose size the mesh axis does not divide
is replicated instead of failing.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None = replicated). Batches split over data x fsdp.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "norm": None,
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one ``-1`` entry takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        shape[shape.index(-1)] = len(devices) // known
    n = int(np.prod(shape))
    if n > len(devices) or n <= 0:
        raise ValueError(f"mesh.shape {shape} needs {n} devices; {len(devices)} are available")
    # A smaller explicit mesh (e.g. (1, 1, 1)) runs on the first n devices.
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


def _mesh_axes_for(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict[str, Any]
) -> P:
    out = []
    for name, size in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        # Replicate dims the mesh axis cannot split evenly (and size-1 axes, which change nothing).
        out.append(None if n == 1 or size % n else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """NamedShardings for ``nnx.state(model, nnx.Param)`` as a pure dict."""
    rules = DEFAULT_RULES if rules is None else rules
    state = nnx.state(model, nnx.Param)

    logical = nnx.to_pure_dict(nnx.get_partition_spec(state))  # P("embed", "mlp") per leaf
    shapes = nnx.to_pure_dict(state)

    def one(spec: P, x: Any) -> NamedSharding:
        names = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
        return NamedSharding(mesh, _mesh_axes_for(names, x.shape, mesh, rules))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: dict[str, Any] | None = None) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; the rest replicated."""
    rules = DEFAULT_RULES if rules is None else rules
    axis = rules["batch"]
    return NamedSharding(mesh, P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along its leading dimension."""
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
