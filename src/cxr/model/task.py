"""What a model's outputs mean: the one place single- and multi-label models differ.

A task is a model's class names and what they are: `Classes`, exclusive classes under one softmax (a
single-label model; two classes make the binary model), or `Findings` that co-occur, one sigmoid each (a
multi-label model). Logits, the combination of test-time views, which answers are uncertain, temperature
scaling, the calls at an operating point and how one image's calls read are asked of the task, so that the
saved model, its guards, evaluation, the reports and the commands don't branch on the kind of model; where a
layer above needs its own per-kind code (the metrics of `cxr.evaluate`), it looks it up by the task's type once.
Plain numpy, like `cxr.model.inference`.
"""

from dataclasses import dataclass

import numpy as np

from cxr.model.inference import (TINY, apply_finding_temperatures, apply_temperature, decide, decide_findings,
                                 positive_class)

NONE_CALLED = "none"  # a multi-label model's label when no finding reaches its threshold
EXPLAINED_FINDINGS = 3  # findings mapped by default for one image: the findings called, most probable first


@dataclass(frozen=True)
class Task:
    """`class_names`: the outputs, in order. Make one with `Task.of`; `Classes` and `Findings` are the kinds."""

    class_names: tuple
    multi_label = False  # as saved in the model's metadata (class_names.json's "multi_label")

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @staticmethod
    def of(class_names, multi_label=False):
        """The task of a model with outputs `class_names`: `Findings` for a `multi_label` model, else `Classes`."""
        return (Findings if multi_label else Classes)(class_names)

    @property
    def outputs(self):
        return len(self.class_names)

    def combine(self, views):
        """(n, classes) the outputs of the mean of the views' logits, from a list of each view's (n, classes)
        outputs: what a model averaging its test-time views computes."""
        return self.from_logits(np.mean([self.logits(v) for v in views], axis=0))

    def called(self, label, probabilities=None):
        """The names called for one image whose call is `label` (as `calibrate` gives it), in the order of the
        outputs, or most probable first given its (classes,) calibrated `probabilities`."""
        order = range(self.outputs) if probabilities is None else np.argsort(-np.asarray(probabilities), kind="stable")
        mask = self.called_mask(label)
        return [self.class_names[k] for k in order if mask[k]]

    def label_text(self, label, probabilities=None):
        """One image's call in words: the class, or the findings called joined by '|' ("none" for none)."""
        return "|".join(self.called(label, probabilities)) or NONE_CALLED

    def explained(self, label, probabilities):
        """Class indices a Grad-CAM map explains by default for one image whose call is `label`, with (classes,)
        calibrated `probabilities`: the class called, or the findings called (most probable first, at most
        EXPLAINED_FINDINGS; the most probable if none is)."""
        order = [int(k) for k in np.argsort(-np.asarray(probabilities), kind="stable")]
        mask = self.called_mask(label)
        return [k for k in order if mask[k]][:EXPLAINED_FINDINGS] or order[:1]


@dataclass(frozen=True)
class Classes(Task):
    """Exclusive classes, one softmax: calls are class indices; an operating point names a positive class, one
    temperature and a threshold (None: the most probable class)."""

    activation = "softmax"

    def logits(self, outputs):
        """(n, classes) logits of (n, classes) outputs, up to a constant per image."""
        return np.log(np.clip(np.asarray(outputs, dtype=np.float64), TINY, 1 - TINY))

    def from_logits(self, logits):
        """(n, classes) outputs of (n, classes) logits: the model's softmax."""
        scaled = np.exp(logits - logits.max(axis=1, keepdims=True))
        return scaled / scaled.sum(axis=1, keepdims=True)

    def uncertain(self, outputs, margin):
        """(n,) True for the images whose (n, classes) outputs leave the answer open: the top class's probability
        below 1 - `margin`."""
        return 1 - np.asarray(outputs).max(axis=1) > margin

    def temperature_scaled(self, outputs, temperature):
        """(n, classes) outputs at one `temperature`."""
        return apply_temperature(outputs, temperature)

    def default_point(self):
        """The operating point before one is fitted: argmax at temperature 1, the default positive class named."""
        return {"positive_class": positive_class(list(self.class_names)), "temperature": 1.0, "threshold": None,
                "method": "argmax"}

    def calibrate(self, point, raw):
        """(calibrated probabilities, (n,) class indices called) of (n, classes) raw outputs at the operating point
        `point` (as `evaluate.metrics.fit_operating_point` returns it)."""
        probabilities = self.temperature_scaled(raw, point["temperature"])
        return probabilities, decide(probabilities, self.class_names.index(point["positive_class"]),
                                     point["threshold"])

    def agreement(self, calls, other_calls):
        """The share of images on which two sets of calls agree."""
        return float(np.mean(np.asarray(calls) == np.asarray(other_calls)))

    def calibration_rule(self, point):
        """How the outputs are calibrated at `point`, in words (the model card's)."""
        return (f"probabilities p are calibrated as softmax(log(p) / temperature), temperature "
                f"{point['temperature']:.4g}")

    def called_mask(self, label):
        """(classes,) True for the class called by `label`, a class index."""
        return np.arange(self.outputs) == int(label)

    def labels_matrix(self, y):
        """(n, classes) 1/0 of (n,) class indices `y`: the one-hot rows of a labels matrix."""
        return np.eye(self.outputs)[np.asarray(y, dtype=int)]

    def thresholds(self, point):
        """Each class's threshold at `point`: the positive class's (None under argmax), None for the others."""
        return [point["threshold"] if name == point["positive_class"] else None for name in self.class_names]


@dataclass(frozen=True)
class Findings(Task):
    """Findings that co-occur, one sigmoid each: calls are (n, findings) 0/1 matrices; an operating point has a
    temperature and a threshold per finding (`point["findings"][name]`)."""

    multi_label = True
    activation = "sigmoid"

    def logits(self, outputs):
        """(n, findings) log-odds of (n, findings) outputs."""
        p = np.clip(np.asarray(outputs, dtype=np.float64), TINY, 1 - TINY)
        return np.log(p) - np.log1p(-p)

    def from_logits(self, logits):
        """(n, findings) outputs of (n, findings) log-odds: the model's sigmoids."""
        return 1 / (1 + np.exp(-logits))

    def uncertain(self, outputs, margin):
        """(n,) True for the images with any finding's probability further than `margin` from 0 and 1."""
        p = np.asarray(outputs)
        return np.any(np.minimum(p, 1 - p) > margin, axis=1)

    def temperature_scaled(self, outputs, temperatures):
        """(n, findings) outputs at one temperature per finding."""
        return apply_finding_temperatures(outputs, temperatures)

    def default_point(self):
        """The operating point before one is fitted: every finding at 0.5, uncalibrated."""
        return {"findings": {f: {"temperature": 1.0, "threshold": 0.5, "method": "default 0.5"}
                             for f in self.class_names}, "method": "default 0.5"}

    def calibrate(self, point, raw):
        """(calibrated probabilities, (n, findings) 0/1 calls) of (n, findings) raw outputs at the operating point
        `point` (as `evaluate.metrics.fit_finding_points` returns it)."""
        findings = [point["findings"][f] for f in self.class_names]
        probabilities = self.temperature_scaled(raw, [f["temperature"] for f in findings])
        return probabilities, decide_findings(probabilities, [f["threshold"] for f in findings])

    def agreement(self, calls, other_calls):
        """The share of images on which two sets of calls agree, for the least agreeing finding."""
        return float(np.min(np.mean(np.asarray(calls) == np.asarray(other_calls), axis=0)))

    def calibration_rule(self, point):
        """How the outputs are calibrated, in words (the model card's)."""
        return ("each finding's probability p is calibrated as sigmoid(logit(p) / temperature) with its own "
                "temperature (operating_point.findings)")

    def called_mask(self, label):
        """(findings,) True for the findings called in `label`, a 0/1 row."""
        return np.asarray(label, dtype=bool)

    def labels_matrix(self, y):
        """(n, findings) 1/0/NaN unknown: `y` is one already."""
        return np.asarray(y, dtype=np.float64)

    def thresholds(self, point):
        """Each finding's threshold at `point`."""
        return [point["findings"][f]["threshold"] for f in self.class_names]
