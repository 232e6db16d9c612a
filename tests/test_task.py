"""Task: what a model's outputs mean, single- or multi-label, asked in one place."""

import numpy as np
import pytest

from cxr.model.task import Classes, Findings, Task

SOFTMAX = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
SIGMOID = np.array([[0.99, 0.02, 0.5], [0.01, 0.98, 0.999]])


def test_logits_give_back_the_outputs_and_views_combine_as_the_mean_of_their_logits():
    single, multi = Classes(["NORMAL", "PNEUMONIA"]), Findings(["A", "B", "C"])
    np.testing.assert_allclose(single.from_logits(single.logits(SOFTMAX)), SOFTMAX, atol=1e-12)
    np.testing.assert_allclose(multi.from_logits(multi.logits(SIGMOID)), SIGMOID, atol=1e-9)
    np.testing.assert_allclose(single.combine([SOFTMAX, SOFTMAX]), SOFTMAX, atol=1e-12)
    # two views' logits averaged: a softmax of the mean log-probabilities, a sigmoid of the mean log-odds
    other = SOFTMAX[:, ::-1]
    mean = (np.log(SOFTMAX) + np.log(other)) / 2
    np.testing.assert_allclose(single.combine([SOFTMAX, other]), np.exp(mean) / np.exp(mean).sum(1, keepdims=True))
    np.testing.assert_allclose(multi.combine([SIGMOID, 1 - SIGMOID]), 0.5, atol=1e-9)


def test_uncertain_answers_are_those_far_from_certain():
    assert Classes(["A", "B"]).uncertain(SOFTMAX, 0.2).tolist() == [False, True, True]
    assert Findings(["A", "B", "C"]).uncertain(SIGMOID, 0.03).tolist() == [True, False]
    assert Findings(["A", "B"]).uncertain(SIGMOID[:, :2], 0.03).tolist() == [False, False]
    assert Findings(["A", "B"]).uncertain(SIGMOID[:, :2], 0.015).tolist() == [True, True]


def test_calls_at_an_operating_point_and_the_default_point():
    single = Classes(["NORMAL", "PNEUMONIA"])
    probabilities, calls = single.calibrate({"positive_class": "PNEUMONIA", "temperature": 1.0, "threshold": 0.55},
                                            SOFTMAX)
    np.testing.assert_allclose(probabilities, SOFTMAX)
    assert calls.tolist() == [0, 1, 0]
    assert single.default_point()["method"] == "argmax"
    assert single.calibrate(single.default_point(), SOFTMAX)[1].tolist() == [0, 1, 0]
    multi = Findings(["A", "B", "C"])
    point = multi.default_point()
    assert set(point["findings"]) == {"A", "B", "C"} and point["findings"]["A"]["threshold"] == 0.5
    probabilities, calls = multi.calibrate(point, SIGMOID)
    assert calls.tolist() == [[1, 0, 1], [0, 1, 1]]
    hotter = {"findings": {f: {"temperature": 2.0, "threshold": 0.5} for f in "ABC"}}
    assert np.all(np.abs(multi.calibrate(hotter, SIGMOID)[0] - 0.5) < np.abs(SIGMOID - 0.5) + 1e-12)


def test_agreement_is_of_the_least_agreeing_finding():
    assert Classes(["A", "B"]).agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    a = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    b = np.array([[1, 0], [0, 1], [0, 0], [0, 1]])
    assert Findings(["A", "B"]).agreement(a, b) == 0.75


def test_a_task_is_a_value():
    task = Classes(["A", "B"])
    assert task == Classes(("A", "B")) and task.outputs == 2 and hash(task) == hash(Classes(("A", "B")))
    with pytest.raises(AttributeError):
        task.multi_label = True


def test_task_of_gives_the_kind_and_one_images_calls_read_alike():
    single, multi = Task.of(["NORMAL", "PNEUMONIA"]), Task.of(["A", "B", "C"], multi_label=True)
    assert isinstance(single, Classes) and isinstance(multi, Findings) and multi.multi_label
    assert single != Findings(["NORMAL", "PNEUMONIA"])  # same names, another kind of model
    assert single.called(1) == ["PNEUMONIA"] and single.label_text(0) == "NORMAL"
    assert multi.called([1, 0, 1]) == ["A", "C"] and multi.called([1, 0, 1], [0.6, 0.1, 0.9]) == ["C", "A"]
    assert multi.label_text([0, 0, 0]) == "none" and multi.label_text([1, 0, 1], [0.6, 0.1, 0.9]) == "C|A"
    assert single.explained(0, [0.3, 0.7]) == [0]  # the class called, not the most probable
    assert multi.explained([1, 0, 1], [0.6, 0.1, 0.9]) == [2, 0] and multi.explained([0, 0, 0], [0.2, 0.4, 0.1]) == [1]
    np.testing.assert_array_equal(single.labels_matrix([1, 0]), [[0, 1], [1, 0]])
    point = {"positive_class": "PNEUMONIA", "temperature": 1.0, "threshold": 0.8}
    assert single.thresholds(point) == [None, 0.8] and multi.thresholds(multi.default_point()) == [0.5] * 3
