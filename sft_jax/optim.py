"""Optimizer and learning-rate schedule from config (optax).

``build_optimizer(cfg, trainable, total_steps)`` returns one ``GradientTransformation``:
global-norm clipping -> the chosen optimizer with a schedule and decoupled weight decay (masked:
no decay on biases and normalization parameters) -> frozen leaves mapped to zero updates by
``optax.multi_transform`` (they carry no optimizer state).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax

from sft_jax import tree_util

# Parameters without weight decay: biases, norm scales/offsets, and anything 1-D.
_NO_DECAY = re.compile(r"(^|/)(bias|LayerNorm|layer_norm|norm|ln_\w+)(/|$)")


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) then ``constant``, ``linear`` decay to 0, or ``cosine`` decay."""
    peak = cfg.learning_rate
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else 0
    if cfg.warmup_ratio > 0:
        warmup = int(round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}; use constant, linear or cosine")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and embeddings, not biases or norms."""
    return tree_util.map_with_path_str(
        lambda path, x: x.ndim > 1 and not _NO_DECAY.search(path), params
    )


def _base_optimizer(cfg: ml_collections.ConfigDict, lr: optax.Schedule):
    # Decay masks are callables: inside multi_transform the inner optimizer sees a tree whose
    # frozen leaves are optax.MaskedNode, so a precomputed mask tree would not match.
    name = cfg.name
    if name == "adamw":
        return optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    if name == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if name == "sgd":
        return optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if name == "lion":
        return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    if name == "adafactor":
        return optax.adafactor(
            lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask
        )
    raise ValueError(f"optimizer.name={name!r}; use adamw, adam, sgd, lion or adafactor")


def build_optimizer(
    cfg: ml_collections.ConfigDict, trainable: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the full update rule.

    Args:
      cfg: the ``optimizer`` config block.
      trainable: bool pytree with the parameters' structure (see ``freezing.trainable_mask``).
      total_steps: optimizer steps of the run, for the schedule.

    Returns:
      ``(tx, lr_schedule)``.
    """
    lr = schedule(cfg, total_steps)
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(_base_optimizer(cfg, lr))
    tx = optax.chain(*chain)
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, lr
