"""Rebuild a trained model from a run directory alone: config.json + run.json + checkpoints.

Used by evaluation and export; needs none of the training code (no optimizer, no train state).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
from flax import nnx

from sft_jax import checkpoint as ckpt_lib
from sft_jax import components
from sft_jax import sharding as sharding_lib
from sft_jax.train_state import split_model


@dataclasses.dataclass
class RestoredRun:
    cfg: ml_collections.ConfigDict
    info: dict  # run.json: label_names, model_dir, ...
    model: nnx.Module
    step: int
    mesh: jax.sharding.Mesh


def load_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config, run_info)`` of a run directory, with a clear error if it is not one."""
    paths = [os.path.join(workdir, n) for n in ("config.json", "run.json")]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"{p} not found: is {workdir!r} a directory written by experiments.train?"
            )
    with open(paths[0]) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    with open(paths[1]) as f:
        info = json.load(f)
    return cfg, info


def restore_run(workdir: str, which: str = "best") -> RestoredRun:
    """The run's model with the parameters of checkpoint ``which`` (best | latest | STEP)."""
    cfg, info = load_run_config(workdir)
    opts = ckpt_lib.CheckpointOptions.from_config(cfg.checkpoint, async_save=False)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} not found: the run has saved no checkpoint yet")
    mngr = ckpt_lib.make_manager(ckpt_dir, opts)
    step = ckpt_lib.resolve_step(mngr, which, opts)
    model = components.build_model(cfg, len(info["label_names"]), path=info["model_dir"])
    mesh = sharding_lib.make_mesh(cfg.mesh.shape)
    shardings = sharding_lib.param_shardings(model, mesh)
    graphdef, params = split_model(model)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params,
        shardings,
    )
    restored = ckpt_lib.restore_params(mngr, step, abstract)
    mngr.close()
    return RestoredRun(
        cfg=cfg, info=info, model=nnx.merge(graphdef, restored), step=step, mesh=mesh
    )
