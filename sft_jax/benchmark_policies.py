"""The benchmark's train step under a freezing policy and an optimizer (``benchmark --policies``).

The model gets the policy's LoRA adapters (``lora.apply_lora_for_policy``), the parameter groups
come from ``freezing.param_groups`` with the model's layer structure, and the update rule from
``optim.build_optimizer`` at a constant learning rate with global-norm clipping: the trainer's
own construction, so the trainable-parameter count and optimizer-state bytes are those of a real
run with that ``freeze.policy`` and ``optimizer.name``.

Unlike ``sft_jax.benchmark``, this module needs ml_collections (the optimizer config).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from sft_jax import freezing, optim
from sft_jax.lora import apply_lora_for_policy
from sft_jax.train_state import split_model, stats_mask


def optimizer_config(
    name: str, learning_rate: float, weight_decay: float, clip_norm: float
) -> ml_collections.ConfigDict:
    """An ``optimizer`` config block: ``name`` at a constant rate (no warmup), the config
    defaults otherwise (betas 0.9 / 0.999, SGD momentum 0.9)."""
    return ml_collections.ConfigDict(
        dict(
            name=name, learning_rate=learning_rate, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
            nesterov=False, muon_beta=0.95, muon_consistent_rms=0.2, weight_decay=weight_decay,
            schedule="constant", decay_ratio=0.1, decay_shape="linear", warmup_steps=0,
            warmup_ratio=0.0, grad_clip_norm=clip_norm, accumulation_steps=1,
        )
    )  # fmt: skip


def policy_model(
    model: nnx.Module,
    policy: str,
    opt_cfg: ml_collections.ConfigDict,
    seed: int = 0,
    loss_scale: bool = False,
) -> tuple[nnx.Module, freezing.ParamGroups, Any, Any, Any]:
    """``(model, groups, tx, lr_schedule, stats)`` for ``policy``: adapters inserted (``lora:R``),
    groups matched with the model's structure, the optimizer built over them (with a dynamic
    loss scale where ``loss_scale``: float16 compute).

    Raises:
      ValueError: the policy does not apply to the model (e.g. ``bitfit`` on a model without
        biases: nothing would train).
    """
    model = apply_lora_for_policy(model, policy, None, seed)
    _, params = split_model(model)
    stats = stats_mask(model)
    groups = freezing.param_groups(
        params, policy, structure=freezing.structure_for(model), never=stats
    )
    tx, lr = optim.build_optimizer(opt_cfg, groups, total_steps=1000, loss_scale=loss_scale)
    return model, groups, tx, lr, stats
