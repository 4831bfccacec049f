"""Classification metrics from a confusion matrix, in numpy (no scikit-learn dependency).

Definitions follow scikit-learn's defaults, so numbers compare with published ones: F1 is 0
where undefined (a class neither present nor predicted), macro-F1 averages over the classes
present in labels or predictions, and MCC is the multi-class (Gorodkin) form, which equals the
usual binary MCC for two classes, and is 0 when undefined (e.g. a constant prediction).
"""

from __future__ import annotations

import numpy as np

# The metric that picks the best epoch (multi-task: its mean over tasks): defined for every label count.
PRIMARY_METRIC = "accuracy"


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """``C[i, j]`` = number of samples with true class i predicted as j."""
    return np.bincount(labels * num_labels + preds, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def compute_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and MCC always; F1 of class 1 for two classes, macro-F1 for more.

    ``preds`` may be class ids or logits of shape (n, num_labels), which are arg-maxed: the
    Trainer hands over logits.
    """
    preds, labels = _class_ids(preds, labels, num_labels)
    matrix = confusion_matrix(preds, labels, num_labels)
    metrics = {"accuracy": float(np.trace(matrix) / matrix.sum())}
    f1 = _per_class_f1(matrix)
    if num_labels == 2:
        metrics["f1"] = float(f1[1])
    elif num_labels > 2:
        present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
        metrics["macro_f1"] = float(f1[present].mean())
    metrics["mcc"] = _mcc(matrix)
    return metrics


def _class_ids(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = np.asarray(preds), np.asarray(labels).astype(np.int64).ravel()
    if preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    preds = preds.astype(np.int64).ravel()
    if preds.shape != labels.shape or labels.size == 0:
        raise ValueError(f"need as many predictions as labels, at least one: got {preds.shape} and {labels.shape}")
    for name, ids in (("predictions", preds), ("labels", labels)):
        if ids.min() < 0 or ids.max() >= num_labels:
            raise ValueError(f"{name} must be class ids in [0, {num_labels}), got range [{ids.min()}, {ids.max()}]")
    return preds, labels


def _per_class_f1(matrix: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (2 TP + FP + FN) per class, 0 where the denominator is 0."""
    tp = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # (TP + FP) + (TP + FN)
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def _mcc(matrix: np.ndarray) -> float:
    """(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with t, p the true and predicted class counts."""
    matrix = matrix.astype(np.float64)
    t, p = matrix.sum(axis=1), matrix.sum(axis=0)
    s, c = matrix.sum(), np.trace(matrix)
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0
