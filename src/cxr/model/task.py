"""What a model's outputs mean: the one place single- and multi-label models differ in how they are served.

A `Task` is a model's class names and whether they are exclusive classes (one softmax: a single-label model;
two classes make the binary model) or findings that co-occur (one sigmoid each: a multi-label model). Logits,
the combination of test-time views, which answers are uncertain, temperature scaling and the calls at an
operating point are asked of the task, so that the saved model and its guards (`cxr.bundle`) don't branch on
the kind of model. Plain numpy, like `cxr.model.inference`.
"""

from dataclasses import dataclass

import numpy as np

from cxr.model.inference import (TINY, apply_finding_temperatures, apply_temperature, decide, decide_findings,
                                 positive_class)


@dataclass(frozen=True)
class Task:
    """`class_names`: the outputs, in order; `multi_label`: one sigmoid per finding (True) or one softmax over
    exclusive classes (False)."""

    class_names: tuple
    multi_label: bool = False

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def outputs(self):
        return len(self.class_names)

    def logits(self, outputs):
        """(n, classes) logits of (n, classes) outputs (for a softmax, up to a constant per image)."""
        p = np.clip(np.asarray(outputs, dtype=np.float64), TINY, 1 - TINY)
        return np.log(p) - np.log1p(-p) if self.multi_label else np.log(p)

    def from_logits(self, logits):
        """(n, classes) outputs of (n, classes) logits: the model's activation."""
        if self.multi_label:
            return 1 / (1 + np.exp(-logits))
        scaled = np.exp(logits - logits.max(axis=1, keepdims=True))
        return scaled / scaled.sum(axis=1, keepdims=True)

    def combine(self, views):
        """(n, classes) the outputs of the mean of the views' logits, from a list of each view's (n, classes)
        outputs: what a model averaging its test-time views computes."""
        return self.from_logits(np.mean([self.logits(v) for v in views], axis=0))

    def uncertain(self, outputs, margin):
        """(n,) True for the images whose (n, classes) outputs leave the answer open: the top class's probability
        below 1 - `margin`, or for a multi-label model any finding's probability further than `margin` from 0
        and 1."""
        p = np.asarray(outputs)
        if self.multi_label:
            return np.any(np.minimum(p, 1 - p) > margin, axis=1)
        return 1 - p.max(axis=1) > margin

    def temperature_scaled(self, outputs, temperatures):
        """(n, classes) outputs at `temperatures`: one for a softmax, one per finding for sigmoids."""
        if self.multi_label:
            return apply_finding_temperatures(outputs, temperatures)
        return apply_temperature(outputs, temperatures)

    def default_point(self):
        """The operating point before one is fitted: argmax at temperature 1 (the default positive class named),
        or every finding at 0.5, uncalibrated."""
        if self.multi_label:
            return {"findings": {f: {"temperature": 1.0, "threshold": 0.5, "method": "default 0.5"}
                                 for f in self.class_names}, "method": "default 0.5"}
        return {"positive_class": positive_class(list(self.class_names)), "temperature": 1.0, "threshold": None,
                "method": "argmax"}

    def calibrate(self, point, raw):
        """(calibrated probabilities, calls) of (n, classes) raw outputs at the operating point `point` (as
        `evaluate.metrics.fit_operating_point` or `fit_finding_points` returns it): calls are (n,) class indices,
        or for a multi-label model an (n, findings) 0/1 matrix of the findings called."""
        if self.multi_label:
            findings = [point["findings"][f] for f in self.class_names]
            probabilities = self.temperature_scaled(raw, [f["temperature"] for f in findings])
            return probabilities, decide_findings(probabilities, [f["threshold"] for f in findings])
        probabilities = self.temperature_scaled(raw, point["temperature"])
        return probabilities, decide(probabilities, self.class_names.index(point["positive_class"]),
                                     point["threshold"])

    def agreement(self, calls, other_calls):
        """The share of images on which two sets of calls agree; for a multi-label model, of the least agreeing
        finding."""
        agree = np.asarray(calls) == np.asarray(other_calls)
        return float(np.min(agree.mean(axis=0))) if self.multi_label else float(agree.mean())
