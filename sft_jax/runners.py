"""How the train step runs on the devices: sharded ``jit`` over a mesh (default) or ``pmap``.

A runner owns the placement of the training state. The trainer keeps ``runner.place(state)``
between steps and hands ``runner.canonical(state)`` (one logical copy, sharded over the mesh)
to checkpointing, evaluation and logging, so those never see the replicated pmap layout.
"""

from __future__ import annotations

from typing import Any

import jax

from sft_jax import sharding as sharding_lib
from sft_jax import steps
from sft_jax.train_state import StepSetup, TrainState


class JitRunner:
    """``jit`` with explicit shardings over ``setup.mesh`` (data / FSDP / tensor parallel)."""

    def __init__(self, setup: StepSetup, task: Any, accumulation_steps: int):
        self.setup = setup
        self.step_fn = steps.make_train_step(setup, task, accumulation_steps)

    def place(self, state: TrainState) -> TrainState:
        return state

    def canonical(self, state: TrainState) -> TrainState:
        return state

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.step_fn(state, sharding_lib.put_batch(batch, self.setup.batch_sharding))

    def num_compilations(self) -> int | None:
        return self.step_fn._cache_size()


class PmapRunner:
    """``jax.pmap`` over all local devices: one replica of the state per device, the batch split
    into ``[D, B/D, ...]``, gradients summed across devices inside the step. ``setup.mesh``
    should be a one-device mesh: the canonical state lives there."""

    def __init__(self, setup: StepSetup, task: Any, accumulation_steps: int):
        self.step_fn = steps.make_pmap_train_step(setup, task, accumulation_steps)
        self.num_devices = len(jax.local_devices())

    def place(self, state: TrainState) -> TrainState:
        return sharding_lib.replicate(state)

    def canonical(self, state: TrainState) -> TrainState:
        return sharding_lib.unreplicate(state)

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        state, metrics = self.step_fn(state, sharding_lib.pmap_batch(batch, self.num_devices))
        return state, sharding_lib.unreplicate(metrics)

    def num_compilations(self) -> int | None:
        return None  # a pmap'ed function exposes no cache size


RUNNERS = {"jit": JitRunner, "pmap": PmapRunner}


def make_runner(mode: str, setup: StepSetup, task: Any, accumulation_steps: int):
    if mode not in RUNNERS:
        raise ValueError(f"mesh.mode={mode!r}; use one of {sorted(RUNNERS)}")
    return RUNNERS[mode](setup, task, accumulation_steps)
