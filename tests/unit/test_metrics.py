import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from sft_jax import metrics


def test_confusion_matrix_exact_and_ignores_padding():
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    preds = np.array([0, 2, 2, 1, 1, 0, 0])
    weights = np.array([1, 1, 1, 1, 1, 1, 0])  # last row is padding
    cm = metrics.confusion_matrix(labels, preds, 3, weights)
    np.testing.assert_array_equal(cm, [[2, 0, 0], [0, 1, 1], [0, 1, 1]])


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = metrics.classification_metrics(metrics.confusion_matrix(labels, preds, 4), list("abcd"))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=range(4), zero_division=0)
    assert m["accuracy"] == pytest.approx((labels == preds).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    for i, name in enumerate("abcd"):
        assert m[f"precision/{name}"] == pytest.approx(p[i])
        assert m[f"recall/{name}"] == pytest.approx(r[i])
        assert m[f"f1/{name}"] == pytest.approx(f[i])
    assert m["num_examples"] == 200


def test_macro_averages_skip_classes_absent_from_labels_and_predictions():
    labels, preds = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])  # class 2 absent
    m = metrics.classification_metrics(metrics.confusion_matrix(labels, preds, 3))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    p, r, _, _ = precision_recall_fscore_support(labels, preds, average="macro")
    assert m["macro_precision"] == pytest.approx(p) and m["macro_recall"] == pytest.approx(r)
    assert m["f1/2"] == 0.0  # still reported per class
    assert metrics.classification_metrics(np.zeros((2, 2)))["macro_f1"] == 0.0


def test_class_never_predicted_scores_zero_not_nan():
    cm = np.array([[3, 0], [2, 0]])  # class 1 never predicted
    m = metrics.classification_metrics(cm)
    assert m["precision/1"] == 0.0 and m["f1/1"] == 0.0
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx((2 * 0.6 * 1.0 / 1.6) / 2)


def test_metric_names_are_what_evaluation_returns_and_a_wrong_one_is_named():
    from sft_jax import evaluation

    names = evaluation.metric_names("classification", ["neg", "pos"])
    assert names == sorted(
        ["accuracy", "loss", "macro_f1", "macro_precision", "macro_recall"]
        + [f"{m}/{c}" for m in ("f1", "precision", "recall") for c in ("neg", "pos")]
    )
    assert evaluation.metric_names("causal_lm") == ["loss", "perplexity", "token_accuracy"]
    evaluation.check_metric("checkpoint.best_metric", "f1/pos", "classification", ["neg", "pos"])
    with pytest.raises(ValueError, match=r"checkpoint.best_metric='macro_f1' .*'perplexity'"):
        evaluation.check_metric("checkpoint.best_metric", "macro_f1", "causal_lm", None)
