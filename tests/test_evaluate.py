import numpy as np
import pytest

from cxr.evaluate import auc_score, metrics, report, report_rows


def test_binary_metrics_match_hand_counts():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.6, 0.4, 0.95])
    probabilities = np.stack([1 - p1, p1], axis=1)
    m = metrics(y, probabilities, ["NORMAL", "PNEUMONIA"])
    # predictions: 0 0 1 1 1 1 0 1 -> TN=2 FP=1 FN=1 TP=4
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["PNEUMONIA"]["recall"] == pytest.approx(4 / 5)
    assert m["per_class"]["NORMAL"]["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    # 15 positive-negative pairs, 13 ranked right (0.7 beats 0.6 and 0.4)
    assert m["auc"] == pytest.approx(13 / 15)
    rows = report_rows(report(y, probabilities, ["NORMAL", "PNEUMONIA"]))
    assert rows[2] == ["PNEUMONIA", "0.8000", "0.8000", "0.8000", "5"]
    assert rows[3] == ["accuracy", "", "", "0.7500", "8"]


def test_auc_is_none_not_nan_for_a_single_class_test_set(capsys):
    probabilities = np.array([[0.2, 0.8], [0.4, 0.6]])
    assert auc_score(np.array([1, 1]), probabilities, 2) is None
    assert "single class" in capsys.readouterr().err


def test_multiclass_auc_is_macro_one_vs_rest():
    y = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y] * 0.7 + 0.1
    assert auc_score(y, perfect, 3) == pytest.approx(1.0)
