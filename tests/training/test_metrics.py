"""Metrics against values computed by hand (worked out in the comments)."""

import math

import numpy as np
import pytest

from metatt_deploy.training.metrics import PRIMARY_METRIC, compute_metrics, confusion_matrix

# Binary: TP=3 (rows 0, 2, 6), FN=1 (row 1), FP=1 (row 4), TN=3.
BINARY_LABELS = np.array([1, 1, 1, 0, 0, 0, 1, 0])
BINARY_PREDS = np.array([1, 0, 1, 0, 1, 0, 1, 0])

# Three classes: confusion [[1, 1, 0], [0, 2, 0], [1, 0, 1]].
MULTI_LABELS = np.array([0, 0, 1, 1, 2, 2])
MULTI_PREDS = np.array([0, 1, 1, 1, 2, 0])


def test_binary_metrics():
    m = compute_metrics(BINARY_PREDS, BINARY_LABELS, 2)
    assert set(m) == {"accuracy", "f1", "mcc"}
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 2TP / (2TP + FP + FN)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4^4)
    assert m["mcc"] == pytest.approx(8 / 16)


def test_f1_takes_class_1_as_positive():
    # Class 1: TP=1, FP=3, FN=0 -> 2/5; class 0 would give 0 (no TP).
    m = compute_metrics(np.array([1, 1, 1, 1]), np.array([0, 0, 0, 1]), 2)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 3 + 0))


def test_multiclass_metrics():
    m = compute_metrics(MULTI_PREDS, MULTI_LABELS, 3)
    assert set(m) == {"accuracy", "macro_f1", "mcc"}
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per-class F1: 2/(2+1+1) = 1/2, 4/(4+1+0) = 4/5, 2/(2+0+1) = 2/3
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # t = (2, 2, 2), p = (2, 3, 1), s = 6, c = 4: (24 - 12) / sqrt((36 - 14)(36 - 12))
    assert m["mcc"] == pytest.approx(12 / math.sqrt(22 * 24))


def test_macro_f1_ignores_classes_neither_present_nor_predicted():
    assert compute_metrics(MULTI_PREDS, MULTI_LABELS, 5)["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_degenerate_cases():
    constant = compute_metrics(np.zeros(4, int), np.array([0, 1, 0, 1]), 2)
    assert constant == {"accuracy": 0.5, "f1": 0.0, "mcc": 0.0}
    assert compute_metrics(BINARY_LABELS, BINARY_LABELS, 2)["mcc"] == pytest.approx(1.0)
    assert compute_metrics(1 - BINARY_LABELS, BINARY_LABELS, 2)["mcc"] == pytest.approx(-1.0)


def test_logits_are_argmaxed():
    logits = np.eye(3)[MULTI_PREDS] * 2.0 - 1.0
    assert compute_metrics(logits, MULTI_LABELS, 3) == compute_metrics(MULTI_PREDS, MULTI_LABELS, 3)


def test_values_are_plain_floats():
    assert all(type(v) is float for v in compute_metrics(BINARY_PREDS, BINARY_LABELS, 2).values())


def test_confusion_matrix_layout():
    assert confusion_matrix(MULTI_PREDS, MULTI_LABELS, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


@pytest.mark.parametrize(
    "preds, labels",
    [([0, 1], [0, 1, 1]), ([], []), ([0, 3], [0, 1]), ([0, 1], [-1, 1])],
)
def test_bad_inputs_are_programming_errors(preds, labels):
    with pytest.raises(ValueError):
        compute_metrics(np.array(preds, dtype=int), np.array(labels, dtype=int), 3)


def test_primary_metric_is_reported_for_every_label_count():
    for k in (2, 3, 5):
        assert PRIMARY_METRIC in compute_metrics(np.arange(10) % k, np.arange(10) % k, k)
