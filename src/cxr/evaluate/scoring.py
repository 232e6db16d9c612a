"""The numbers of a task: its headline AUC, its temperatures, its calibration error, its operating point, a
subgroup's numbers and the pairs a Grad-CAM gallery picks from.

A model of exclusive classes (`cxr.model.task.Classes`) is scored on class indices; a model of findings
(`Findings`) on a labels matrix (1 / 0 / NaN unknown), each finding on its known labels. `scoring(task)` gives
the one that fits a task, so the guards, the recalibration and training ask it instead of branching on the kind
of model.
"""

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr.evaluate.metrics import (auc_score, expected_calibration_error, finding_calibration_error,
                                  fit_finding_points, fit_finding_temperature, fit_operating_point, fit_temperature,
                                  rank_auc, rates)
from cxr.model.inference import positive_class
from cxr.model.task import Classes, Findings


class ClassScoring:
    """Exclusive classes: `y` holds (n,) class indices."""

    def __init__(self, task):
        self.task = task

    def auc(self, y, outputs):
        """Binary AUC, or the macro one-vs-rest AUC for more classes; None for one class."""
        return auc_score(y, outputs, self.task.outputs)

    def temperatures(self, y, outputs):
        """The one temperature fitted to (n, classes) outputs by likelihood."""
        return fit_temperature(y, outputs)

    def calibration_error(self, y, probabilities):
        """The expected calibration error of the top label."""
        return expected_calibration_error(y, probabilities)

    def fit_point(self, y, raw, positive=None, target_sensitivity=None, keep=None):
        """The operating point fitted on (n, classes) raw outputs: the temperature, then for two classes the
        threshold on `positive` (the default positive class when None) by Youden's J or a sensitivity target.
        Every class gets a new point, so `keep` (a previous point, for findings without both classes) is unused."""
        names = list(self.task.class_names)
        return fit_operating_point(y, raw, names, positive_class(names, positive), target_sensitivity)

    def group_numbers(self, y, probabilities, calls, positive_index):
        """What a subgroup gets (`evaluate.subgroups`): its count, prevalence, AUC, sensitivity and specificity of
        the class `positive_index` at the saved operating point (`calls`: (n,) class indices)."""
        is_positive = y == positive_index
        sensitivity, specificity = rates(is_positive, calls == positive_index)
        return {"n_images": int(len(y)), "prevalence": float(is_positive.mean()) if len(y) else float("nan"),
                "auc_roc": rank_auc(is_positive, probabilities[:, positive_index]), "sensitivity": sensitivity,
                "specificity": specificity}

    def pairs(self, y, calls, probabilities, positive_index):
        """The (image, class) pairs a Grad-CAM gallery picks from: every image with the positive class, as
        (images, classes, truly positive, called positive, calibrated probability, the class its map explains:
        the class called)."""
        images = np.arange(len(y))
        return (images, np.full(len(y), positive_index), y == positive_index, calls == positive_index,
                probabilities[:, positive_index], calls)


class FindingScoring:
    """Findings: `y` is an (n, findings) labels matrix, 1 / 0 / NaN unknown."""

    def __init__(self, task):
        self.task = task

    def _fittable(self, y):
        """(finding index, its known rows) of each finding with both positives and negatives known."""
        for k in range(self.task.outputs):
            known = ~np.isnan(y[:, k])
            if len(np.unique(y[known, k])) == 2:
                yield k, known

    def auc(self, y, outputs):
        """The mean over findings of each finding's AUC on its known labels (findings with one class known left
        out); None when no finding has both."""
        aucs = [roc_auc_score(y[known, k], outputs[known, k]) for k, known in self._fittable(y)]
        return float(np.mean(aucs)) if aucs else None

    def temperatures(self, y, outputs):
        """One temperature per finding, fitted on its known labels (1.0 where it has one class only)."""
        temperatures = [1.0] * self.task.outputs
        for k, known in self._fittable(y):
            temperatures[k] = fit_finding_temperature(y[known, k] == 1, outputs[known, k])
        return temperatures

    def calibration_error(self, y, probabilities):
        """The expected calibration error over every (image, finding) pair with a known label."""
        return finding_calibration_error(y, probabilities)

    def fit_point(self, y, raw, positive=None, target_sensitivity=None, keep=None):
        """A temperature and a threshold per finding, fitted on its known labels (`metrics.fit_finding_points`:
        a finding without both classes keeps its point in `keep`, else 0.5)."""
        return fit_finding_points(y, raw, list(self.task.class_names), target_sensitivity, keep=keep)

    def group_numbers(self, y, probabilities, calls, positive_index=None):
        """What a subgroup gets (`evaluate.subgroups`): its count and prevalence, the means over findings of AUC,
        sensitivity and specificity at the saved operating point (`calls`: (n, findings) 0/1), and each finding's
        AUC and sensitivity."""
        per = {}
        for k, name in enumerate(self.task.class_names):
            known = ~np.isnan(y[:, k])
            is_positive = y[known, k] == 1
            sensitivity, specificity = rates(is_positive, calls[known, k] == 1)
            per[name] = (rank_auc(is_positive, probabilities[known, k]), sensitivity, specificity)
        known = ~np.isnan(y)
        mean = [float(np.nanmean([v[i] for v in per.values()])) for i in range(3)]
        return {"n_images": int(len(y)), "prevalence": float(np.mean(y[known])) if known.any() else float("nan"),
                "auc_roc": mean[0], "sensitivity": mean[1], "specificity": mean[2],
                **{f"{name} auc_roc": v[0] for name, v in per.items()},
                **{f"{name} sensitivity": v[1] for name, v in per.items()}}

    def pairs(self, y, calls, probabilities, positive_index=None):
        """The (image, finding) pairs a Grad-CAM gallery picks from: every pair with a known label, as (images,
        findings, truly positive, called, calibrated probability, the finding its map explains)."""
        images, findings = np.nonzero(~np.isnan(y))
        return (images, findings, y[images, findings] == 1, calls[images, findings] == 1,
                probabilities[images, findings], findings)


def scoring(task):
    """The scoring of `task` (a `cxr.model.task.Task`)."""
    return {Classes: ClassScoring, Findings: FindingScoring}[type(task)](task)
