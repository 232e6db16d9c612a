"""Task: what a model's outputs mean, single- or multi-label, asked in one place."""

import numpy as np
import pytest

from cxr.model.task import Task

SOFTMAX = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
SIGMOID = np.array([[0.99, 0.02, 0.5], [0.01, 0.98, 0.999]])


def test_logits_give_back_the_outputs_and_views_combine_as_the_mean_of_their_logits():
    single, multi = Task(["NORMAL", "PNEUMONIA"]), Task(["A", "B", "C"], multi_label=True)
    np.testing.assert_allclose(single.from_logits(single.logits(SOFTMAX)), SOFTMAX, atol=1e-12)
    np.testing.assert_allclose(multi.from_logits(multi.logits(SIGMOID)), SIGMOID, atol=1e-9)
    np.testing.assert_allclose(single.combine([SOFTMAX, SOFTMAX]), SOFTMAX, atol=1e-12)
    # two views' logits averaged: a softmax of the mean log-probabilities, a sigmoid of the mean log-odds
    other = SOFTMAX[:, ::-1]
    mean = (np.log(SOFTMAX) + np.log(other)) / 2
    np.testing.assert_allclose(single.combine([SOFTMAX, other]), np.exp(mean) / np.exp(mean).sum(1, keepdims=True))
    np.testing.assert_allclose(multi.combine([SIGMOID, 1 - SIGMOID]), 0.5, atol=1e-9)


def test_uncertain_answers_are_those_far_from_certain():
    assert Task(["A", "B"]).uncertain(SOFTMAX, 0.2).tolist() == [False, True, True]
    assert Task(["A", "B", "C"], True).uncertain(SIGMOID, 0.03).tolist() == [True, False]
    assert Task(["A", "B"], True).uncertain(SIGMOID[:, :2], 0.03).tolist() == [False, False]
    assert Task(["A", "B"], True).uncertain(SIGMOID[:, :2], 0.015).tolist() == [True, True]


def test_calls_at_an_operating_point_and_the_default_point():
    single = Task(["NORMAL", "PNEUMONIA"])
    probabilities, calls = single.calibrate({"positive_class": "PNEUMONIA", "temperature": 1.0, "threshold": 0.55},
                                            SOFTMAX)
    np.testing.assert_allclose(probabilities, SOFTMAX)
    assert calls.tolist() == [0, 1, 0]
    assert single.default_point()["method"] == "argmax"
    assert single.calibrate(single.default_point(), SOFTMAX)[1].tolist() == [0, 1, 0]
    multi = Task(["A", "B", "C"], multi_label=True)
    point = multi.default_point()
    assert set(point["findings"]) == {"A", "B", "C"} and point["findings"]["A"]["threshold"] == 0.5
    probabilities, calls = multi.calibrate(point, SIGMOID)
    assert calls.tolist() == [[1, 0, 1], [0, 1, 1]]
    hotter = {"findings": {f: {"temperature": 2.0, "threshold": 0.5} for f in "ABC"}}
    assert np.all(np.abs(multi.calibrate(hotter, SIGMOID)[0] - 0.5) < np.abs(SIGMOID - 0.5) + 1e-12)


def test_agreement_is_of_the_least_agreeing_finding():
    assert Task(["A", "B"]).agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    a = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    b = np.array([[1, 0], [0, 1], [0, 0], [0, 1]])
    assert Task(["A", "B"], True).agreement(a, b) == 0.75


def test_a_task_is_a_value():
    task = Task(["A", "B"])
    assert task == Task(("A", "B")) and task.outputs == 2 and hash(task) == hash(Task(("A", "B")))
    with pytest.raises(AttributeError):
        task.multi_label = True
