"""Device mesh, logical-axis rules and the shardings of parameters, state and batches.

Every parameter carries logical axis names (``("embed", "mlp")``). One rules table maps each
logical name to a mesh axis; data parallel, FSDP and tensor parallel differ only by the mesh
shape (axes ``data``, ``fsdp``, ``tensor``). A dimension whose size the mesh axis does not divide
is replicated instead of failing.

The pmap alternative (``steps.make_pmap_train_step``) needs no rules: ``replicate`` puts one full
copy of the state on each device, ``pmap_batch`` reshapes a host batch to ``[D, B/D, ...]`` and
``unreplicate`` takes one copy back.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
PMAP_AXIS = "devices"  # the axis name under jax.pmap (psum / axis_index refer to it)

# logical axis -> mesh axis (or None = replicated). Batches split over data x fsdp.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    # Llama k/v projections [embed, kv_heads * head_dim], split like "heads" (with fewer kv heads
    # than tensor devices the split falls inside heads: still exact, GSPMD adds the collectives:
    # 2 kv heads on 4 devices, 4 collective-permutes and 6 all-gathers per layer in the compiled
    # train step). GPT-2's fused c_attn [embed, 3 * embed] is stored head by head (models/gpt2.py),
    # so its column split gives each device whole heads. With the heads dividing the tensor axis,
    # Llama and GPT-2 move no activations (tests/unit/test_parallel.py).
    "kv": "tensor",
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
        # -1 takes all the remaining devices: a product that does not divide the device count
        # would otherwise leave some idle (8 devices, (3, -1, 1) -> 6) or ask for 0.
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"mesh.shape {shape}: the {len(devices)} devices cannot be split into "
                f"{known} x (-1); make the other entries' product divide {len(devices)}"
            )
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
    """NamedShardings for the model's Params and BatchStats (``train_state.split_model``'s
    params) as a pure dict."""
    rules = DEFAULT_RULES if rules is None else rules
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))

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


def process_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The rows of a [B, ...] global batch that this process's devices hold under ``sharding``:
    one contiguous block (as for meshes whose data axes are laid out process by process, the
    order of ``jax.devices()`` that ``make_mesh`` keeps).

    Raises:
      ValueError: naming the config keys, when the mesh does not split ``global_batch``
        evenly, this process holds no device of the mesh, or its rows are not one block.
    """
    _check_divisible(global_batch, sharding)
    index = sharding.addressable_devices_indices_map((global_batch,))
    blocks = sorted({ix[0].indices(global_batch)[:2] for ix in index.values()})
    shape = tuple(sharding.mesh.shape.values())
    if not blocks:
        raise ValueError(
            f"process {jax.process_index()} holds no device of mesh.shape {shape}: use a "
            "mesh over every process's devices (a -1 entry takes them all)"
        )
    if any(a[1] != b[0] for a, b in zip(blocks, blocks[1:])):
        raise ValueError(
            f"process {jax.process_index()}'s devices hold rows {blocks} of the batch, not one "
            f"block, under mesh.shape {shape}: order the mesh's data axes process by process "
            "(make_mesh over jax.devices())"
        )
    return slice(blocks[0][0], blocks[-1][1])


def feed_rows(mesh: Mesh, batch_size: int) -> slice | None:
    """The rows of each ``batch_size``-row batch that this process's data pipeline builds
    (``components.batches(..., process_rows=...)``): None, the whole batch, with one process;
    else the rows its devices hold (``process_rows`` of ``batch_sharding(mesh)``)."""
    if jax.process_count() == 1:
        return None
    return process_rows(batch_sharding(mesh), batch_size)


def row_axes(sharding: NamedSharding) -> tuple[tuple[str, ...], int]:
    """The mesh axes ``sharding`` splits the leading (batch) dimension over, and how many
    parts that makes (1 for none)."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes, int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=int))


def _check_divisible(rows: int, sharding: NamedSharding) -> None:
    """Raises a ValueError naming the config keys when ``rows`` cannot be split evenly over the
    mesh axes of the batch dimension (JAX's own error names neither)."""
    axes, n = row_axes(sharding)
    if rows % n:
        raise ValueError(
            f"a batch of {rows} rows cannot be split over {n} devices (mesh axes {axes} of "
            f"mesh.shape {tuple(sharding.mesh.shape.values())}): make data.batch_size (and "
            f"data.eval_batch_size) a multiple of {n}, or change mesh.shape"
        )


def global_rows(sharding: NamedSharding, local_rows: int) -> int:
    """The rows of the global batch of which this process holds ``local_rows`` under
    ``sharding`` (``local_rows`` itself with one process)."""
    axes, parts = row_axes(sharding)
    rows = process_rows(sharding, parts)  # one row per part: how many parts are this process's
    mine = rows.stop - rows.start
    if local_rows % mine:
        raise ValueError(
            f"this process's {local_rows} rows cannot be split into the {mine} parts of the "
            f"batch it holds (mesh axes {axes} of mesh.shape "
            f"{tuple(sharding.mesh.shape.values())})"
        )
    return local_rows // mine * parts


def local_rows(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, np.ndarray]:
    """This process's rows (``process_rows``) of a global host batch: what ``put_batch`` takes.
    The pipelines build only these (``components.batches(..., process_rows=...)``); this is for
    a batch made whole (benchmarks, tests)."""
    rows = process_rows(sharding, len(next(iter(batch.values()))))
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def whole_rows(local: np.ndarray, rows: slice | None) -> np.ndarray:
    """[B, ...]: every process's ``local`` [R, ...] int32 (what it holds of some row-wise data:
    its ``rows`` of a batch, ``feed_rows``) put together in row order, each block of rows once.
    ``local`` itself with one process (``rows`` None); else a collective that every process
    calls at the same point.

    Raises:
      ValueError: processes that hold the same rows (as when the tensor axis spans them) hold
        different values for them: they built different batches.
    """
    if rows is None:
        return local
    from jax.experimental import multihost_utils

    start = np.full((1, *local.shape[1:]), rows.start, np.int32)  # one gather carries both
    held = np.asarray(multihost_utils.process_allgather(np.concatenate([start, local])))
    blocks: dict[int, np.ndarray] = {}
    for process, part in enumerate(held):  # part: [1 + R, ...]
        first, values = int(part.reshape(-1)[0]), part[1:]
        if not np.array_equal(blocks.setdefault(first, values), values):
            raise ValueError(
                f"process {process} holds other values for rows {first}.. of the batch than "
                "another process holding the same rows: the processes built different batches "
                "(different data files, config or code?)"
            )
    return np.concatenate([blocks[first] for first in sorted(blocks)])


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along its leading dimension.

    ``batch`` holds this process's rows of the global batch (``process_rows``; all of it when
    there is one process): each process of a multi-host run builds only the rows its devices
    hold, assembled into global arrays with ``jax.make_array_from_process_local_data``.
    """
    rows = len(next(iter(batch.values())))
    if jax.process_count() == 1:
        _check_divisible(rows, sharding)
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    total = global_rows(sharding, rows)  # divisible by construction
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (total,) + np.shape(v)[1:]
        )
        for k, v in batch.items()
    }


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One full copy of every leaf on each device: ``[D, ...]`` arrays laid out as ``jax.pmap``
    (over ``devices``, axis ``PMAP_AXIS``) takes them, so the first step copies nothing.

    Args:
        tree: Arrays (e.g. a TrainState), on any devices or sharded on any mesh.
        devices: Target devices (default: all local devices).
    """
    devices = list(devices if devices is not None else jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

    def one(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        copies = [jnp.expand_dims(jax.device_put(x, d), 0) for d in devices]  # [1, ...]
        return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, copies)

    return jax.tree.map(one, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of every ``[D, ...]`` leaf (pmap outputs, replicated state)."""
    return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)


def pmap_batch(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """``[B, ...]`` host arrays -> ``[D, B/D, ...]``: device d gets rows ``d*B/D`` onwards."""

    def split(x: np.ndarray) -> np.ndarray:
        if x.shape[0] % num_devices:
            raise ValueError(
                f"batch size {x.shape[0]} not divisible by {num_devices} devices (mesh.mode="
                "pmap): make data.batch_size and data.eval_batch_size multiples of it"
            )
        return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

    return {k: split(np.asarray(v)) for k, v in batch.items()}
