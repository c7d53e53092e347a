"""Sharding constraints on the activations at transformer block boundaries.

Under a sharded step (``steps.make_train_step``, ``steps.make_eval_step``) the hidden states
between blocks ([B, T, H]) are pinned to the batch's layout: rows split over the batch's mesh
axes (data x fsdp), the sequence and hidden dimensions whole on every device, so replicated over
``tensor`` (Megatron-style tensor parallelism: each block starts from the full hidden states and
ends with one all-reduce). Without a constraint GSPMD picks the layout between blocks from what
surrounds them, and on meshes that mix fsdp and tensor it picked layouts that move activations
between devices (``tests/unit/test_parallel.py`` counts the collectives). As MaxText's
``activation_batch`` / ``activation_embed`` constraints.

The layout is read while the step is traced (``trace_setting``): ``scope(batch_sharding)``
around the model call; outside one (pmap, generation, a model called eagerly) ``constrain`` is
the identity.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sft_jax import sharding
from sft_jax.models import trace_setting
from sft_jax.models.layers import Array

BATCH_SHARDING: trace_setting.TraceSetting[NamedSharding | None] = trace_setting.TraceSetting(
    "activation_batch_sharding", None
)


def scope(batch_sharding: NamedSharding | None):
    """Constrains the block boundaries traced inside the block to ``batch_sharding``'s row
    layout (None: no constraint)."""
    return BATCH_SHARDING.scope(batch_sharding)


def constrain(x: Array) -> Array:
    """``x`` ([B, ...]) with its rows split as the current batch sharding's and its other
    dimensions whole on each device; unchanged outside a ``scope``, for a batch sharding that
    does not split rows, or where the rows do not split evenly (a micro-batch smaller than the
    mesh's batch axes)."""
    batch = BATCH_SHARDING.get()
    if batch is None:
        return x
    axes, n = sharding.row_axes(batch)
    if not axes or x.shape[0] % n:
        return x
    spec = P(batch.spec[0], *(None,) * (x.ndim - 1))  # the batch's own row entry
    return jax.lax.with_sharding_constraint(x, NamedSharding(batch.mesh, spec))
