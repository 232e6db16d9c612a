"""Metrics, operating point, calibration and bootstrap intervals against values computed by hand."""

import numpy as np
import pytest

from cxr.errors import UserError
from cxr.evaluate.metrics import (auc_score, choose_threshold, confidence_intervals, expected_calibration_error,
                                  fit_operating_point, fit_temperature, headline_metrics)
from cxr.evaluate.report import classification_rows, metric_rows
from cxr.model.inference import apply_temperature, decide, positive_class

NAMES = ["NORMAL", "PNEUMONIA"]
Y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
P1 = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.6, 0.4, 0.95])
PROBS = np.stack([1 - P1, P1], axis=1)


def test_binary_metrics_at_a_threshold_match_hand_counts():
    m = headline_metrics(Y, PROBS, NAMES, positive_index=1, threshold=0.5)
    # predictions 0 0 1 1 1 1 0 1 -> TN=2 FP=1 FN=1 TP=4
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(4 / 5)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["auc_roc"] == pytest.approx(13 / 15)  # 15 positive-negative pairs, 13 ranked right
    assert m["auc_pr"] == pytest.approx((1 + 1 + 1 + 4 / 5 + 5 / 6) / 5)  # precision at each positive's rank
    assert m["brier"] == pytest.approx(np.mean((P1 - Y) ** 2))
    # a stricter threshold: 0 0 0 1 1 0 0 1 -> TP=3 FN=2 TN=3 FP=0
    strict = headline_metrics(Y, PROBS, NAMES, positive_index=1, threshold=0.75)
    assert (strict["sensitivity"], strict["specificity"], strict["ppv"]) == pytest.approx((3 / 5, 1.0, 1.0))


def test_undefined_ratios_are_nan_not_errors():
    m = headline_metrics(Y, PROBS, NAMES, positive_index=1, threshold=0.99)  # nothing called positive
    assert np.isnan(m["ppv"]) and m["sensitivity"] == 0 and m["specificity"] == 1


def test_expected_calibration_error_by_hand():
    # confidences 0.9 0.8 0.7 0.8 0.9 0.6 0.6 0.95; correct T T F T T T F T; 15 bins
    # bins: {0.9, 0.9} acc 1 | {0.8, 0.8} acc 1 | {0.7} acc 0 | {0.6, 0.6} acc 0.5 | {0.95} acc 1
    assert expected_calibration_error(Y, PROBS) == pytest.approx((2 * 0.1 + 2 * 0.2 + 0.7 + 2 * 0.1 + 0.05) / 8)


def test_youden_threshold_and_target_sensitivity_by_hand():
    # J at each threshold: 0.95 .2, 0.9 .4, 0.8 .6, 0.7 .27, 0.6 .47, 0.4 .67, 0.2 .33, 0.1 0
    threshold, sensitivity, specificity = choose_threshold(Y == 1, P1)
    assert (threshold, sensitivity, specificity) == pytest.approx((0.4, 1.0, 2 / 3))
    assert choose_threshold(Y == 1, P1, target_sensitivity=0.8)[0] == pytest.approx(0.6)
    assert choose_threshold(Y == 1, P1, target_sensitivity=0.5)[0] == pytest.approx(0.8)
    assert choose_threshold(Y == 1, P1, target_sensitivity=1.0)[0] == pytest.approx(0.4)


def test_decide_uses_the_threshold_for_binary_and_argmax_otherwise():
    assert decide(PROBS, 1, 0.4).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert decide(PROBS, 0, 0.85).tolist() == [0, 1, 1, 1, 1, 1, 1, 1]  # NORMAL as positive: p0 >= .85
    three = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert decide(three, 1, 0.1).tolist() == [0, 2]


def test_temperature_scaling_recovers_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * true_logit))
    probabilities = np.stack([1 - overconfident, overconfident], axis=1)
    temperature = fit_temperature(y, probabilities)
    assert temperature == pytest.approx(3, rel=0.15)
    calibrated = apply_temperature(probabilities, temperature)
    assert expected_calibration_error(y, calibrated) < expected_calibration_error(y, probabilities) / 2
    assert np.allclose(apply_temperature(probabilities, 1.0), probabilities)
    assert (calibrated.argmax(1) == probabilities.argmax(1)).all()  # scaling never changes the ranking


def test_operating_point_is_fitted_on_the_data_given_and_stored_whole():
    point = fit_operating_point(Y, PROBS, NAMES, "PNEUMONIA")
    assert point["positive_class"] == "PNEUMONIA" and point["method"] == "youden"
    calibrated = apply_temperature(PROBS, point["temperature"])[:, 1]
    # the threshold is on the calibrated scale, at the calibrated score of the 0.4 image
    assert point["threshold"] == pytest.approx(calibrated[6])
    target = fit_operating_point(Y, PROBS, NAMES, "PNEUMONIA", target_sensitivity=0.8)
    assert target["threshold"] == pytest.approx(calibrated[5]) and target["val_sensitivity"] >= 0.8
    assert fit_operating_point(np.array([0, 1, 2]), np.eye(3) * 0.8 + 0.066, ["A", "B", "C"], "B")["threshold"] is None


def test_positive_class_default_and_bad_name():
    assert positive_class(NAMES) == "PNEUMONIA"
    assert positive_class(["cat", "dog", "eel"]) == "dog"
    assert positive_class(NAMES, "NORMAL") == "NORMAL"
    with pytest.raises(UserError, match="'COVID' is not one of the classes"):
        positive_class(NAMES, "COVID")


def headline_of(y, probabilities):
    return lambda rows: headline_metrics(y[rows], probabilities[rows], NAMES, 1, 0.5)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    small = confidence_intervals(headline_of(Y, PROBS), Y, n_resamples=500, seed=1)
    point = headline_metrics(Y, PROBS, NAMES, 1, 0.5)
    for name in ("sensitivity", "specificity", "accuracy", "auc_roc", "brier"):
        assert small[name][0] <= point[name] <= small[name][1], name
    big_y, big_p = np.tile(Y, 16), np.tile(PROBS, (16, 1))
    big = confidence_intervals(headline_of(big_y, big_p), big_y, n_resamples=500, seed=1)
    for name in ("sensitivity", "specificity", "accuracy", "auc_roc"):
        assert big[name][1] - big[name][0] < (small[name][1] - small[name][0]) / 2, name
    assert confidence_intervals(headline_of(Y, PROBS), Y, n_resamples=500, seed=1) == small  # seeded
    assert confidence_intervals(headline_of(Y, PROBS), Y, n_resamples=0) == {}


def test_multiclass_metrics_are_one_vs_rest_with_macro_means():
    y = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3]])
    m = headline_metrics(y, probabilities, ["a", "b", "c"], positive_index=1)
    assert m["a sensitivity"] == pytest.approx(1 / 2) and m["b sensitivity"] == pytest.approx(1.0)
    assert m["b ppv"] == pytest.approx(2 / 3) and m["c specificity"] == pytest.approx(1.0)
    assert m["macro sensitivity"] == pytest.approx(m["balanced_accuracy"])
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_auc_is_none_not_nan_for_a_single_class_test_set(capsys):
    assert auc_score(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), 2) is None
    assert "single class" in capsys.readouterr().err


def test_report_rows():
    from cxr.evaluate.metrics import classification

    rows = classification_rows(classification(Y, decide(PROBS, 1, 0.5), NAMES))
    assert rows[2] == ["PNEUMONIA", "0.8000", "0.8000", "0.8000", "5"]
    assert rows[3] == ["accuracy", "", "", "0.7500", "8"]
    assert metric_rows({"ppv": float("nan"), "f1": 0.5}, {"f1": [0.25, 0.75]}) == [
        ["metric", "value", "ci_low", "ci_high"], ["ppv", "", "", ""], ["f1", "0.500000", "0.250000", "0.750000"]]


def test_calibrating_on_a_site_refits_temperature_and_threshold_on_its_arrays():
    from cxr.commands.calibrate import refit_operating_point, small_classes

    from cxr.model.task import Classes

    class Model:  # what refit_operating_point reads of a SavedModel
        task = Classes(NAMES)
        operating_point = {"positive_class": "PNEUMONIA", "temperature": 1.0, "threshold": 0.5}

    # a site where the model's scores run high: every normal scores 0.6-0.7, every pneumonia 0.8-0.95
    y = np.array([0] * 30 + [1] * 30)
    p1 = np.concatenate([np.linspace(0.6, 0.7, 30), np.linspace(0.8, 0.95, 30)])
    point = refit_operating_point(Model(), y, np.stack([1 - p1, p1], axis=1))
    calibrated = apply_temperature(np.stack([1 - p1, p1], axis=1), point["temperature"])[:, 1]
    assert point["method"] == "youden" and point["val_sensitivity"] == 1 and point["val_specificity"] == 1
    assert calibrated[y == 0].max() < point["threshold"] <= calibrated[y == 1].min()  # separates the site
    raw = np.stack([1 - p1, p1], axis=1)

    def nll(temperature):
        return -np.mean(np.log(apply_temperature(raw, temperature)[np.arange(len(y)), y]))
    assert point["temperature"] != 1 and nll(point["temperature"]) < nll(1.0)  # the site's own calibration
    target = refit_operating_point(Model(), y, np.stack([1 - p1, p1], axis=1), target_sensitivity=0.5)
    assert target["threshold"] > point["threshold"] and target["method"] == "sensitivity >= 0.5"
    assert small_classes({"NORMAL": 19, "PNEUMONIA": 20}) == ["NORMAL"]


def test_proportions_get_exact_intervals_and_few_cases_a_caution():
    """Issue 46: 'sensitivity 1.000 (1.000 to 1.000)' from 9 positives: a bootstrap of a proportion at its bound has
    zero width; the exact interval of 9 of 9 is about 0.66 to 1.00."""
    from cxr.evaluate.metrics import few_cases, proportion_intervals

    is_positive = np.array([True] * 9 + [False] * 30)
    called = np.array([True] * 9 + [True] * 3 + [False] * 27)
    intervals = proportion_intervals(is_positive, called)
    assert intervals["sensitivity"][0] == pytest.approx(0.664, abs=0.001) and intervals["sensitivity"][1] == 1.0
    low, high = intervals["specificity"]
    assert low < 27 / 30 < high and intervals["ppv"][0] < 9 / 12 < intervals["ppv"][1]
    assert intervals["npv"] == [pytest.approx(0.872, abs=0.001), 1.0]
    assert "9 positive and 30 negative images" in few_cases(is_positive)
    assert few_cases(np.array([True] * 20 + [False] * 20)) is None
    assert proportion_intervals(np.array([False, False]), np.array([False, False]))["sensitivity"] == [None, None]
