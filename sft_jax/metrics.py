"""Classification metrics computed on the host from a confusion matrix.

All metrics derive from one integer confusion matrix ``cm[true, pred]`` so that evaluation over
many batches only accumulates counts (exact, order independent) and the metrics are computed
once at the end.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Counts ``cm[true, pred]``; rows with weight 0 (padding examples) are ignored.

    Args:
      labels: int array [N] of true classes.
      preds: int array [N] of predicted classes.
      num_classes: K, the matrix is [K, K].
      weights: optional [N] array; only entries > 0 are counted.

    Returns:
      int64 array [K, K].
    """
    labels = np.asarray(labels).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if weights is not None:
        keep = np.asarray(weights).reshape(-1) > 0
        labels, preds = labels[keep], preds[keep]
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # Precision/recall of a class that is never predicted / never present is 0 (sklearn's
    # zero_division=0 convention), not NaN, so macro averages stay defined.
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def _present_mean(x: np.ndarray, seen: np.ndarray) -> float:
    return float(x[seen].mean()) if seen.any() else 0.0


def classification_metrics(cm: np.ndarray, label_names: list[str] | None = None) -> dict:
    """Accuracy, macro and per-class precision / recall / F1 from a confusion matrix.

    Args:
      cm: [K, K] counts, rows are true classes, columns predictions.
      label_names: optional K names used as keys of the per-class metrics.

    Returns:
      A flat dict: ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``,
      ``{precision,recall,f1}/<name>`` per class, ``num_examples`` and ``confusion_matrix``
      (nested lists). The macro averages run over the classes that occur among the labels or
      the predictions (as scikit-learn's ``average="macro"`` and torchmetrics do): a class
      absent from both, as in a small or partial evaluation, does not count as an F1 of 0.
    """
    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    names = label_names or [str(i) for i in range(k)]
    tp = np.diag(cm)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0  # classes among the labels or predictions
    out = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": _present_mean(precision, seen),
        "macro_recall": _present_mean(recall, seen),
        "macro_f1": _present_mean(f1, seen),
        "num_examples": int(total),
    }
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
        out[f"f1/{name}"] = float(f1[i])
    out["confusion_matrix"] = cm.astype(np.int64).tolist()
    return out
