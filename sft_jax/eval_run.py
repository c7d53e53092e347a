"""Evaluate a model (restored from a run, or pretrained) on one split of a config's data.

Used by ``experiments.evaluate``: held-out metrics of the task (``sft_jax.evaluation``) and,
for causal LMs, exact match of greedy replies (``sft_jax.gen_eval``).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from sft_jax import components, steps
from sft_jax import sharding as sharding_lib
from sft_jax.data import feed as feed_lib
from sft_jax.evaluation import evaluate
from sft_jax.tasks import get_task
from sft_jax.train_state import split_model


def evaluate_model(
    cfg: ml_collections.ConfigDict,
    model: nnx.Module,
    split: str,
    *,
    label_names: list[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Held-out metrics of ``model`` on ``split`` of ``cfg``'s data.

    Args:
      cfg: the run's config (data, batch sizes, ``generation`` settings for causal LMs).
      model: the model to evaluate (its parameters are placed on ``mesh``).
      split: "validation", "test", ...
      label_names: class names (classification).
      mesh: device mesh (default ``cfg.mesh.shape``).

    Returns:
      The task's metrics; for causal LMs also ``exact_match``, ``stopped`` (replies ending with
      an end-of-turn token), per-family scores and sample replies.
    """
    mesh = mesh or sharding_lib.make_mesh(cfg.mesh.shape)
    data, tokenizer = components.load_data(cfg)
    rows = sharding_lib.feed_rows(mesh, cfg.data.eval_batch_size)  # this process's share
    ds = components.batches(cfg, data, tokenizer, split, train=False, process_rows=rows)
    # Read ahead on an accelerator, as training does (train.prefetch_threads; same batches).
    ds = feed_lib.read_ahead(ds, feed_lib.config_threads(cfg))
    graphdef, params = split_model(model)
    # A pretrained model sits on one device; a restored run's on its mesh: place both on this one.
    param_sh = sharding_lib.param_shardings(model, mesh)
    params = jax.device_put(params, param_sh)
    batch_sh = sharding_lib.batch_sharding(mesh)
    eval_step = steps.make_eval_step(graphdef, get_task(cfg.model.task), param_sh, batch_sh)
    result = evaluate(cfg.model.task, eval_step, params, ds, batch_sh, label_names=label_names)
    if components.is_lm(cfg):
        from sft_jax.gen_eval import exact_match_eval
        from sft_jax.lora import merge_lora

        g = cfg.generation
        result.update(
            exact_match_eval(
                merge_lora(model),  # same outputs, fewer matmuls per decoded token
                tokenizer,
                data.sources[split],
                batch_size=g.batch_size,
                max_new_tokens=g.max_new_tokens,
                max_examples=g.max_examples,
            )
        )
    return result
