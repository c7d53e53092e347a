"""Dynamic loss scaling for float16 compute (``model.dtype=float16``), as PyTorch's
``torch.amp.GradScaler``.

float16 has more mantissa bits than bfloat16 (10 against 7) but only 5 exponent bits (against
8): gradients below about 6e-8 round to zero on the way back through float16 activations.
The train step multiplies the loss by a scale before differentiating and divides the float32
gradients by it afterwards, so small gradients stay representable. The scale starts at 2**16;
a non-finite gradient (the scale was too large: an overflow) halves it, and the step is
skipped by the step's own non-finite rule (parameters and moments keep their last good
values); after ``interval`` finite steps in a row it doubles (while the doubled scale is
finite).

The scale's rule reads the gradients alone; the step also skips a non-finite loss. The two
agree in practice (a non-finite float32 loss gives non-finite gradients); where they would not,
the scale just counts one more good step.

The scale lives in the optimizer state, as the first transform of the chain
(``optim.build_optimizer(..., loss_scale=True)``): checkpoints keep it, and its state is one of
the optimizer's clocks (``optimizers.clock_mask``), so it moves on skipped steps too, which
keep the rest of the optimizer state. ``current(opt_state)`` is the scale the step uses (None
when the chain has none: float32 and bfloat16 runs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

INIT_SCALE = 2.0**16  # GradScaler's defaults
GROWTH_INTERVAL = 2000


def needed(compute_dtype: str) -> bool:
    """Whether a step computing in ``compute_dtype`` (a dtype name) scales its loss: float16
    only (bfloat16 has float32's exponent range)."""
    return compute_dtype == "float16"


class LossScaleState(NamedTuple):
    """``scale``: float32 scalar, the factor of the next step's loss; ``good_steps``: int32
    scalar, finite steps since the scale last changed."""

    scale: jax.Array
    good_steps: jax.Array


def dynamic_loss_scale(
    init_scale: float = INIT_SCALE, interval: int = GROWTH_INTERVAL
) -> optax.GradientTransformation:
    """A transform that passes the (already unscaled) gradients through unchanged and updates
    the scale: halved after a non-finite gradient (never below 1), doubled after ``interval``
    finite ones in a row (unless the doubled scale would overflow float32)."""

    def init(params: Any) -> LossScaleState:
        del params
        return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates: Any, state: LossScaleState, params: Any = None) -> tuple:
        del params
        finite = jnp.isfinite(optax.tree.norm(updates))
        grow = finite & (state.good_steps + 1 >= interval) & jnp.isfinite(state.scale * 2.0)
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * 2.0, state.scale),
            jnp.maximum(state.scale * 0.5, 1.0),
        )
        good = jnp.where(finite & ~grow, state.good_steps + 1, 0)
        return updates, LossScaleState(scale, good.astype(jnp.int32))

    return optax.GradientTransformation(init, update)


def current(opt_state: Any) -> jax.Array | None:
    """The loss scale held in ``opt_state`` (a float32 scalar), or None when it holds none."""
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LossScaleState))
        if isinstance(x, LossScaleState)
    ]
    if len(found) > 1:
        raise ValueError("the optimizer state holds more than one loss scale")
    return found[0].scale if found else None
