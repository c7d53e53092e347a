"""Evaluation loop: run the jitted eval step over a split and turn counts into metrics."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np

from sft_jax import metrics as metrics_lib
from sft_jax import sharding as sharding_lib


def evaluate_classification(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict],
    label_names: list[str],
    batch_sharding: Any,
    max_batches: int = 0,
) -> dict:
    """Accuracy, macro/per-class P/R/F1, confusion matrix and mean loss over ``batches``.

    Args:
      eval_step: jitted ``(params, batch) -> {"preds", "loss_sum", "weight"}``.
      params: the parameters to evaluate.
      batches: host batches (dicts of numpy arrays with ``labels`` and ``example_mask``).
      label_names: class names, index = label id.
      batch_sharding: where batches go on the mesh.
      max_batches: stop after this many batches (0 = all).
    """
    k = len(label_names)
    cm = np.zeros((k, k), np.int64)
    loss_sum = weight = 0.0
    pending = None  # keep one batch in flight: host work overlaps the device step

    def collect(out, host_batch):
        nonlocal cm, loss_sum, weight
        out = jax.device_get(out)
        cm += metrics_lib.confusion_matrix(
            host_batch["labels"], out["preds"], k, host_batch["example_mask"]
        )
        loss_sum += float(out["loss_sum"])
        weight += float(out["weight"])

    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = eval_step(params, sharding_lib.put_batch(batch, batch_sharding))
        if pending is not None:
            collect(*pending)
        pending = (out, batch)
    if pending is not None:
        collect(*pending)
    result = metrics_lib.classification_metrics(cm, label_names)
    result["loss"] = loss_sum / max(weight, 1.0)
    return result
