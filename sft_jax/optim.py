"""Optimizer and learning-rate schedule from config (optax).

``build_optimizer(cfg, groups, total_steps)`` returns one ``GradientTransformation``:

  [the dynamic loss scale (float16 compute only, ``loss_scale``): passes gradients through]
  -> [gradients of not-yet-unfrozen leaves zeroed (gradual unfreezing only)]
  -> global-norm clipping (over every trainable gradient)
  -> ``optax.multi_transform``: one optimizer per parameter group, i.e. per distinct
     (lr_mult, wd_mult, unfreeze step) among trainable leaves, each with the schedule times
     lr_mult, weight decay times wd_mult (decoupled, masked off biases and norms), and for a
     gradually unfrozen group a gate (``optimizers.start_at``); frozen leaves map to
     ``optax.set_to_zero`` and carry no optimizer state.

``groups`` is a ``freezing.ParamGroups`` or, as before, a plain bool mask (multipliers 1).
Optimizers: ``sft_jax.optimizers``. Schedules (``schedule``): linear warmup from 0, then
``constant``, ``linear`` or ``cosine`` decay to 0, or ``wsd`` (warmup-stable-decay).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sft_jax import loss_scale as loss_scale_lib
from sft_jax.freezing import ParamGroups
from sft_jax.optimizers import (  # noqa: F401  (re-exported)
    OPTIMIZERS,
    base_optimizer,
    check_name,
    decay_mask,
    eval_params,
    has_eval_params,
    start_at,
    zero_until,
)

SCHEDULES = ("constant", "linear", "cosine", "wsd")
WSD_DECAY_SHAPES = ("linear", "sqrt")


def _wsd(cfg: ml_collections.ConfigDict, total_steps: int, warmup: int) -> optax.Schedule:
    """Warmup-stable-decay after the warmup: the peak until the last ``decay_ratio`` of the
    run's steps, then to 0 at ``total_steps``, linearly or as ``1 - sqrt`` (``decay_shape``)."""
    peak, ratio = cfg.learning_rate, cfg.get("decay_ratio", 0.1)
    shape = cfg.get("decay_shape", "linear")
    if shape not in WSD_DECAY_SHAPES:
        raise ValueError(f"optimizer.decay_shape={shape!r}; use one of {WSD_DECAY_SHAPES}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"optimizer.decay_ratio={ratio} must be in [0, 1]")
    decay = int(round(ratio * total_steps))
    stable = total_steps - warmup - decay
    if stable < 0:
        raise ValueError(
            f"optimizer.schedule=wsd: warmup ({warmup} steps) + decay (decay_ratio={ratio}: "
            f"{decay} steps) exceed the run's {total_steps} steps"
        )
    if decay == 0:
        return optax.constant_schedule(peak)
    if shape == "linear":
        tail = optax.linear_schedule(peak, 0.0, decay)
    else:
        tail = lambda t: peak * (1.0 - jnp.sqrt(jnp.clip(t / decay, 0.0, 1.0)))
    return optax.join_schedules([optax.constant_schedule(peak), tail], [stable])


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) then ``constant``, ``linear`` decay to 0, ``cosine`` decay, or
    ``wsd`` (constant, then decay over the last ``decay_ratio`` of the steps).

    The warmup lasts ``warmup_steps`` when that is positive, else ``warmup_ratio`` of the run
    (as in Hugging Face's ``TrainingArguments``: set steps win over the default ratio)."""
    peak = cfg.learning_rate
    if cfg.warmup_steps < 0 or cfg.warmup_ratio < 0:
        raise ValueError(
            f"optimizer.warmup_steps={cfg.warmup_steps}, optimizer.warmup_ratio="
            f"{cfg.warmup_ratio}: neither may be negative"
        )
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif cfg.schedule == "wsd":
        after = _wsd(cfg, total_steps, warmup)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _group_settings(groups: ParamGroups) -> tuple[Any, dict[str, tuple[float, float, int]]]:
    """``(labels, {label: (lr_mult, wd_mult, start)})``: ``"frozen"`` for frozen leaves,
    ``"train"`` for the plain group (1, 1, 0), ``"group_<i>"`` for the others (sorted, so the
    same policy gives the same labels, and checkpoints restore)."""
    steps = groups.unfreeze_step
    if steps is None:
        steps = jax.tree.map(lambda _: 0, groups.trainable)
    keys = jax.tree.map(
        lambda t, lr, wd, s: (float(lr), float(wd), int(s)) if t else None,
        groups.trainable, groups.lr_mult, groups.wd_mult, steps,
    )  # fmt: skip
    distinct = sorted(
        {k for k in jax.tree.leaves(keys, is_leaf=lambda x: isinstance(x, tuple))},
        key=lambda k: (k[2], -k[0], -k[1]),
    )
    names = {k: "train" if k == (1.0, 1.0, 0) else f"group_{i}" for i, k in enumerate(distinct)}
    labels = jax.tree.map(
        lambda k: "frozen" if k is None else names[k],
        keys,
        is_leaf=lambda x: x is None or isinstance(x, tuple),
    )
    return labels, {names[k]: k for k in distinct}


def _group_optimizer(
    cfg: ml_collections.ConfigDict, lr: optax.Schedule, lr_mult: float, wd_mult: float, start: int
) -> optax.GradientTransformation:
    """The optimizer of one group: schedule * lr_mult (shifted by ``start``, so that a group
    gated until ``start`` follows the run's schedule), weight decay * wd_mult."""
    group_lr = lr
    if lr_mult != 1.0 or start:
        group_lr = lambda count: lr(count + start) * lr_mult
    tx = base_optimizer(cfg, group_lr, cfg.weight_decay * wd_mult)
    return start_at(tx, start) if start else tx


def build_optimizer(
    cfg: ml_collections.ConfigDict,
    groups: ParamGroups | Any,
    total_steps: int,
    loss_scale: bool = False,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the full update rule.

    Args:
      cfg: the ``optimizer`` config block.
      groups: a ``freezing.ParamGroups`` (``freezing.param_groups``), or a bool pytree with the
        parameters' structure (``freezing.trainable_mask``: multipliers 1).
      total_steps: optimizer steps of the run, for the schedule.
      loss_scale: start the chain with a dynamic loss scale (``sft_jax.loss_scale``; float16
        compute).

    Returns:
      ``(tx, lr_schedule)``; ``lr_schedule`` is the base schedule (multiplier 1).

    Raises:
      ValueError: an unknown optimizer or schedule (listing the supported ones), or
        ``schedule_free_adamw`` with a decaying schedule.
    """
    check_name(cfg.name)
    if cfg.name == "schedule_free_adamw" and cfg.schedule != "constant":
        raise ValueError(
            f"optimizer.name=schedule_free_adamw replaces the decay schedule: set "
            f"optimizer.schedule=constant (warmup still applies), not {cfg.schedule!r}"
        )
    if not isinstance(groups, ParamGroups):
        groups = ParamGroups.from_mask(groups)
    lr = schedule(cfg, total_steps)
    labels, settings = _group_settings(groups)
    transforms = {"frozen": optax.set_to_zero()}
    for label, (lr_mult, wd_mult, start) in settings.items():
        transforms[label] = _group_optimizer(cfg, lr, lr_mult, wd_mult, start)
    chain = []
    if loss_scale:
        init = cfg.get("loss_scale_init", loss_scale_lib.INIT_SCALE)
        chain.append(loss_scale_lib.dynamic_loss_scale(init))
    if groups.unfreeze_step is not None:
        chain.append(zero_until(groups.unfreeze_step))
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), lr
