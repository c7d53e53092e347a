"""The optimizers ``optimizer.name`` selects, and the small transforms parameter groups need.

Every optimizer takes a learning-rate schedule and a weight-decay strength (both already scaled
by the group's multipliers, see ``optim.build_optimizer``). Weight decay is decoupled
(``p -= lr_t * weight_decay * p``, as AdamW) and masked by ``decay_mask``: matrices and
embeddings decay, biases and normalization parameters do not.

  ``adamw``    Adam with decoupled weight decay (``optax.adamw``).
  ``adam``     Adam, no weight decay.
  ``sgd``      SGD with ``momentum`` (0 = none) and ``nesterov``; no weight decay.
  ``adafactor`` factored second moments (``optax.adafactor``; relative step sizes: the update
               is scaled by the parameter's RMS) + decoupled decay scaled by the learning rate
               (as Hugging Face's Adafactor).
  ``lion``     sign momentum (``optax.lion``) + decoupled decay.
  ``lamb``     Adam + decay with a per-layer trust ratio (``optax.lamb``).
  ``muon``     ``optax.contrib.muon``: Newton-Schulz orthogonalized momentum on the hidden
               weight matrices (``kernel`` leaves of rank >= 2 outside the head; conv kernels
               flattened to [H*W*I, O]), Adam on everything else (embeddings, head, norms,
               biases, LoRA factors), as Muon's authors prescribe. Updates are RMS-matched to
               AdamW (``muon_consistent_rms``, Moonshot's recipe) so one learning rate serves
               both parts. + decoupled decay.
  ``schedule_free_adamw`` Schedule-Free AdamW (``optax.contrib.schedule_free``; warmup, then a
               constant rate: set ``optimizer.schedule=constant``). The trained parameters are
               the gradient-evaluation sequence y; evaluate and export ``eval_params(...)``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, ScheduleFreeState

from sft_jax import tree_util
from sft_jax.loss_scale import LossScaleState
from sft_jax.policies import HEAD_PATTERN

if TYPE_CHECKING:  # annotations only: the train step imports this module, not the config stack
    import ml_collections

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "lamb", "muon", "schedule_free_adamw")

# Parameters without weight decay: biases, norm scales/offsets, and anything 1-D.
_NO_DECAY = re.compile(r"(^|/)(bias|LayerNorm|layer_norm|norm|ln_\w+)(/|$)")
_HEAD = re.compile(HEAD_PATTERN)


def check_name(name: str) -> None:
    """Raises ValueError listing the supported optimizers when ``name`` is not one."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}; supported optimizers: {', '.join(OPTIMIZERS)}")


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and embeddings, not biases or norms."""
    return tree_util.map_with_path_str(
        lambda path, x: x.ndim > 1 and not _NO_DECAY.search(path), params
    )


class _CountState(NamedTuple):
    count: jax.Array  # int32 [], updates applied so far


def _scaled_decay(lr: optax.ScalarOrSchedule, weight_decay: float) -> optax.GradientTransformation:
    """Adds ``-lr_t * weight_decay * p`` to the (final, signed) updates."""

    def init(params):
        del params
        return _CountState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        rate = lr(state.count) if callable(lr) else lr
        updates = jax.tree.map(
            lambda u, p: (u - rate * weight_decay * p).astype(u.dtype), updates, params
        )
        return updates, _CountState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


def decoupled_weight_decay(
    lr: optax.ScalarOrSchedule, weight_decay: float
) -> optax.GradientTransformation:
    """Decoupled weight decay after an optimizer's final update, on ``decay_mask`` leaves only
    (identity for ``weight_decay == 0``)."""
    if not weight_decay:
        return optax.identity()
    return optax.masked(_scaled_decay(lr, weight_decay), decay_mask)


def muon_dimension_numbers(params: Any) -> Any:
    """Muon's per-leaf spec: ``MuonDimensionNumbers`` (reduce over every axis but the last) for
    ``kernel`` leaves of rank >= 2 outside the head, None (Adam) for everything else."""

    def spec(path: str, x: Any) -> MuonDimensionNumbers | None:
        if not path.endswith("kernel") or x.ndim < 2 or _HEAD.search(path):
            return None
        return MuonDimensionNumbers(reduction_axis=tuple(range(x.ndim - 1)), output_axis=x.ndim - 1)

    return tree_util.map_with_path_str(spec, params)


def _muon(cfg: ml_collections.ConfigDict, lr: optax.ScalarOrSchedule, wd: float):
    rms = cfg.get("muon_consistent_rms", 0.2)
    muon = optax.contrib.muon(
        lr,
        beta=cfg.get("muon_beta", 0.95),
        eps=cfg.eps,
        adam_b1=cfg.b1,
        adam_b2=cfg.b2,
        muon_weight_dimension_numbers=muon_dimension_numbers,
        consistent_rms=rms or None,
    )
    return optax.chain(muon, decoupled_weight_decay(lr, wd))


def _schedule_free_adamw(cfg: ml_collections.ConfigDict, lr: optax.ScalarOrSchedule, wd: float):
    # optax.contrib.schedule_free_adamw with the decay masked (optax's decays every leaf).
    base = optax.chain(
        optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(wd, decay_mask),
        optax.scale_by_learning_rate(lr),
    )
    return optax.contrib.schedule_free(base, learning_rate=lr, b1=cfg.b1)


def base_optimizer(
    cfg: ml_collections.ConfigDict, lr: optax.ScalarOrSchedule, weight_decay: float
) -> optax.GradientTransformation:
    """The ``cfg.name`` optimizer at learning rate ``lr`` with (masked) ``weight_decay``.

    Decay masks are callables: inside ``multi_transform`` the optimizer sees a tree whose other
    groups' leaves are ``optax.MaskedNode``, so a precomputed mask tree would not match.
    """
    check_name(cfg.name)
    name, wd = cfg.name, weight_decay
    if name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    if name == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if name == "sgd":
        if cfg.nesterov and not cfg.momentum:
            raise ValueError("optimizer.nesterov=True needs optimizer.momentum > 0")
        return optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if name == "lion":
        return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
    if name == "lamb":
        return optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    if name == "adafactor":
        return optax.chain(optax.adafactor(lr), decoupled_weight_decay(lr, wd))
    if name == "muon":
        return _muon(cfg, lr, wd)
    return _schedule_free_adamw(cfg, lr, wd)


class _GateState(NamedTuple):
    count: jax.Array  # int32 [], updates seen so far
    inner: Any


def start_at(inner: optax.GradientTransformation, step: int) -> optax.GradientTransformation:
    """``inner`` from optimizer step ``step`` on (gradual unfreezing of one group).

    Before ``step`` the incoming gradients and the outgoing updates are zero (so decoupled
    weight decay cannot move the parameters either) and the inner state stays as initialized,
    counters included: at ``step`` the inner optimizer starts fresh (Adam's bias correction
    from 1), as if training of these parameters began there. Give ``inner`` a schedule shifted
    by ``step`` to follow the run's global schedule.
    """

    def init(params):
        return _GateState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        on = state.count >= step
        gate = lambda x: jnp.where(on, x, jnp.zeros_like(x))
        new_updates, new_inner = inner.update(jax.tree.map(gate, updates), state.inner, params)
        new_inner = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_inner, state.inner)
        count = optax.safe_int32_increment(state.count)
        return jax.tree.map(gate, new_updates), _GateState(count, new_inner)

    return optax.GradientTransformation(init, update)


def zero_until(steps: Any) -> optax.GradientTransformation:
    """Zeroes the gradient of each leaf before its step (int tree like the params), so that
    parameters not yet unfrozen do not count in global-norm clipping."""

    def init(params):
        del params
        return _CountState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        keep = lambda g, s: g if s == 0 else jnp.where(state.count >= s, g, jnp.zeros_like(g))
        updates = jax.tree.map(keep, updates, steps)
        return updates, _CountState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


# The loss scale moves on skipped steps too: a skip after an overflow is what halves it.
_CLOCKS = (optax.ScaleByScheduleState, _CountState, _GateState, LossScaleState)


def clock_mask(opt_state: Any) -> Any:
    """True on the optimizer-state leaves that count steps for a schedule or a gate (learning-
    rate schedules, scheduled weight decay, gradual-unfreezing gates) and on the float16 loss
    scale (``loss_scale``), False on the rest (moments, and the counts behind Adam-style bias
    correction).

    A skipped (non-finite) update keeps the False leaves and advances the True ones, as a
    PyTorch loop that skips ``optimizer.step()`` but still calls ``scheduler.step()``: the
    schedule stays in step with the data position and the logged learning rate.
    """

    def mark(x: Any) -> Any:
        if isinstance(x, _GateState):
            return _GateState(True, clock_mask(x.inner))
        if isinstance(x, ScheduleFreeState):  # its step count clocks its learning-rate schedule
            no = jax.tree.map(lambda _: False, x)
            return no._replace(step_count=True, base_optimizer_state=clock_mask(
                x.base_optimizer_state))  # fmt: skip
        if isinstance(x, _CLOCKS):
            return jax.tree.map(lambda _: True, x)
        return False

    return jax.tree.map(
        mark, opt_state, is_leaf=lambda x: isinstance(x, (*_CLOCKS, ScheduleFreeState))
    )


def _is_sf(x: Any) -> bool:
    return isinstance(x, ScheduleFreeState)


def has_eval_params(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the optimizer evaluates at another point than the one it trains
    (``eval_params``): Schedule-Free."""
    return cfg.name == "schedule_free_adamw"


def eval_params(cfg: ml_collections.ConfigDict, opt_state: Any, params: Any) -> Any:
    """The parameters evaluation and checkpoint export should use.

    Schedule-Free trains the interpolated sequence y (``params``) but its averaged sequence
    ``x = (y - (1 - b1) z) / b1`` is what generalizes (``optax.contrib.schedule_free_eval_params``
    per parameter group; frozen parameters unchanged). Every other optimizer: ``params`` itself.
    """
    if not has_eval_params(cfg):
        return params
    masked = lambda x: isinstance(x, optax.MaskedNode)
    for state in jax.tree.leaves(opt_state, is_leaf=_is_sf):
        if not _is_sf(state):
            continue
        b1 = state.b1

        def average(z, y):
            return y if masked(z) else ((y - (1.0 - b1) * z) / b1).astype(y.dtype)

        params = jax.tree.map(average, state.z, params, is_leaf=masked)
    return params
