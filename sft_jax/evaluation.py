"""Evaluation loops: run the jitted eval step over a split and turn sums into metrics.

``evaluate`` dispatches on the task: classification gives accuracy, macro / per-class P/R/F1,
the confusion matrix and the loss; causal LM gives the loss and perplexity over target
(assistant) tokens. Generation-based scores (exact match) live in ``sft_jax.gen_eval``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import numpy as np

from sft_jax import metrics as metrics_lib
from sft_jax import sharding as sharding_lib


def _run(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict],
    batch_sharding: Any,
    collect: Callable[[dict], None],
) -> None:
    """Calls ``collect(host_outputs)`` for each batch, one batch in flight so that host work
    overlaps the device step. The outputs are the whole batch's (replicated by the eval step),
    also in a multi-host run, where each process feeds only its own rows."""
    pending = None
    for batch in batches:
        out = eval_step(params, sharding_lib.put_batch(batch, batch_sharding))
        if pending is not None:
            collect(jax.device_get(pending))
        pending = out
    if pending is not None:
        collect(jax.device_get(pending))


def evaluate_classification(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict],
    label_names: list[str],
    batch_sharding: Any,
) -> dict:
    """Accuracy, macro/per-class P/R/F1, confusion matrix and mean loss over ``batches``.

    Args:
      eval_step: jitted ``(params, batch) -> {"preds", "labels", "example_mask", "loss_sum",
        "weight"}`` (``tasks.ClassificationTask.eval_outputs``).
      params: the parameters to evaluate.
      batches: this process's rows of each batch (dicts of numpy arrays; all rows with one
        process); ``eval_step`` returns the whole batch's ``labels`` and ``example_mask`` with
        the predictions.
      label_names: class names, index = label id.
      batch_sharding: where batches go on the mesh.
    """
    k = len(label_names)
    cm = np.zeros((k, k), np.int64)
    sums = {"loss_sum": 0.0, "weight": 0.0}

    def collect(out):
        nonlocal cm
        cm += metrics_lib.confusion_matrix(out["labels"], out["preds"], k, out["example_mask"])
        for key in sums:
            sums[key] += float(out[key])

    _run(eval_step, params, batches, batch_sharding, collect)
    result = metrics_lib.classification_metrics(cm, label_names)
    result["loss"] = sums["loss_sum"] / max(sums["weight"], 1.0)
    return result


def evaluate_lm(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict],
    batch_sharding: Any,
) -> dict:
    """Mean loss and perplexity over the target tokens of ``batches``.

    Args:
      eval_step: jitted ``(params, batch) -> {"loss_sum", "weight", "correct"}``.
      params: the parameters to evaluate.
      batches: this process's rows of each batch of ``sft_jax.data.lm`` (all rows with one
        process).
      batch_sharding: where batches go on the mesh.

    Returns:
      ``loss`` (nats per target token), ``perplexity`` (exp of it), ``token_accuracy`` (argmax
      equals the target) and ``num_target_tokens``.
    """
    sums = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}

    def collect(out):
        for key in sums:
            sums[key] += float(out[key])

    _run(eval_step, params, batches, batch_sharding, collect)
    w = max(sums["weight"], 1.0)
    loss = sums["loss_sum"] / w
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "token_accuracy": sums["correct"] / w,
        "num_target_tokens": int(sums["weight"]),
    }


def evaluate(
    task_name: str,
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict],
    batch_sharding: Any,
    *,
    label_names: list[str] | None = None,
) -> dict:
    """The task's held-out metrics over ``batches`` (see the module docstring); a partial
    evaluation passes a slice of the split."""
    if task_name == "causal_lm":
        return evaluate_lm(eval_step, params, batches, batch_sharding)
    return evaluate_classification(
        eval_step, params, batches, list(label_names or []), batch_sharding
    )


def metric_names(task_name: str, label_names: list[str] | None = None) -> list[str]:
    """The float metrics ``evaluate`` returns for the task (read from an evaluation of no
    batches, so the list cannot drift from what it returns)."""
    empty = evaluate(task_name, None, None, [], None, label_names=label_names)
    return sorted(k for k, v in empty.items() if isinstance(v, float))


def check_metric(key: str, name: str, task_name: str, label_names: list[str] | None) -> None:
    """Raises a ValueError naming config ``key`` and the choices unless ``name`` is one of
    ``metric_names``: before training, not at the first evaluation."""
    names = metric_names(task_name, label_names)
    if name not in names:
        raise ValueError(f"{key}={name!r} is not a validation metric of this task (one of {names})")
