"""The training state pytree and its sharded construction.

``TrainState`` holds only arrays (so Orbax saves it and ``jit`` donates it); the static parts a
step needs (the model's graph definition, the optimizer, the trainable mask) live in
``StepSetup``. ``params`` is a pure nested dict (``nnx.to_pure_dict(nnx.State)``), which
``nnx.merge`` accepts directly, of the model's variables: its ``nnx.Param``s and, for models
with batch normalization, its ``nnx.BatchStat`` running statistics. The statistics are never
trained (the trainable mask is False there and the optimizer keeps no state for them); the train
step writes their updated values (``StepSetup.stats``). So checkpoints, evaluation and export see
one tree that is the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sft_jax import sharding as sharding_lib
from sft_jax import tree_util


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all leaves are arrays).

    Attributes:
      step: int32 scalar, the number of optimizer updates applied.
      params: nested dict of the model's variables (``nnx.Param`` and ``nnx.BatchStat``).
      opt_state: optax state; frozen parameters have none (``optax.MaskedNode``).
      rng: uint32 [2] raw PRNG key data; the dropout key of step ``s`` is ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Static, non-array parts of training: hashable by identity, closed over by the step."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    trainable: Any  # bool pytree with the structure of params
    lr_schedule: optax.Schedule
    mesh: Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding
    stats: Any = None  # bool pytree, True at BatchNorm running statistics; None: the model has none


# The variables a model's state is made of (any other kind is an error: it would be lost).
MODEL_VARIABLES = (nnx.Param, nnx.BatchStat)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, params)``: params is a pure dict of the Params and BatchStats."""
    graphdef, params, rest = nnx.split(model, MODEL_VARIABLES, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "the model holds variables other than nnx.Param / nnx.BatchStat, which TrainState "
            f"would not keep: {jax.tree.map(lambda x: x.shape, rest)}"
        )
    return graphdef, nnx.to_pure_dict(params)


def stats_mask(model: nnx.Module) -> Any | None:
    """Bool pytree over ``split_model``'s params: True at ``nnx.BatchStat`` leaves; None when the
    model has none (the step then skips the statistics bookkeeping)."""
    stats = tree_util.flatten_to_dict(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    if not stats:
        return None
    _, params = split_model(model)
    return tree_util.map_with_path_str(lambda path, _: path in stats, params)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    rules: dict | None = None,
) -> TrainState:
    """Places the model's params on ``mesh`` by the logical-axis rules and initializes the
    optimizer state with the matching shardings (param-shaped optimizer leaves follow their
    parameter; counters are replicated)."""
    _, params = split_model(model)
    p_shard = sharding_lib.param_shardings(model, mesh, rules)
    params = jax.device_put(params, p_shard)
    abstract_opt = jax.eval_shape(tx.init, params)
    repl = sharding_lib.replicated(mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen leaves: no state, keep as is
    # Param-shaped state follows its parameter; other per-parameter state (Adafactor's factored
    # row/column statistics) is replicated.
    opt_shard = optax.tree_map_params(
        tx,
        lambda x, s, p: x if masked(x) else (s if x.shape == p.shape else repl),
        abstract_opt,
        p_shard,
        params,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: masked(x) or isinstance(x, NamedSharding),
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), repl),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(rng, repl),
    )


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every array leaf (for jit in/out shardings and restore targets)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: a restore target that allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
