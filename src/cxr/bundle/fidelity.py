"""How closely a faster way of serving a model (int8, the views on demand) answers like float32 with every view:
the measures and tolerances both guards share (`bundle.precision`, `bundle.views_on_demand`)."""

import time

import numpy as np

AUC_TOLERANCE = 0.002
PROBABILITY_TOLERANCE = 0.05


# One timing of a hundred images moved by up to 20 % from one run to the next on a 2-core machine, enough to turn
# a guard's "faster" either way (benchmarks/README.md): each is timed this many times, the best kept, as timeit does
TIMING_ROUNDS = 3


def speeds(predictors, images, rounds=TIMING_ROUNDS):
    """{name: images/s} of each of `predictors` ({name: predictor}) on `images`: the best of `rounds` rounds, each
    timing every predictor in turn, so that a passing slowdown of the machine falls on all of them alike."""
    x = np.asarray(images, dtype=np.float32)
    for predictor in predictors.values():
        predictor.predict_on_batch(x[:4])  # plans and allocates
    best = dict.fromkeys(predictors, 0.0)
    for _ in range(rounds):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict_on_batch(x)
            best[name] = max(best[name], len(x) / (time.perf_counter() - start))
    return best


def mean_auc(y, outputs, task):
    """The headline AUC of (n, classes) outputs of a model of `task` (`cxr.model.task.Task`): binary, macro
    one-vs-rest, or for a multi-label model the mean over findings of each finding's AUC on its known labels
    (findings with one class known left out)."""
    from sklearn.metrics import roc_auc_score

    from cxr.evaluate.metrics import auc_score

    if not task.multi_label:
        return auc_score(y, outputs, task.outputs)
    aucs = []
    for k in range(outputs.shape[1]):
        known = ~np.isnan(y[:, k])
        if len(np.unique(y[known, k])) == 2:
            aucs.append(roc_auc_score(y[known, k], outputs[known, k]))
    return float(np.mean(aucs)) if aucs else None


def calibrated(y, float_outputs, outputs, task):
    """`outputs` at the temperature(s) fitted on the float32 outputs `float_outputs` of the same images."""
    from cxr.evaluate.metrics import fit_finding_temperature, fit_temperature

    if not task.multi_label:
        return task.temperature_scaled(outputs, fit_temperature(y, float_outputs))
    temperatures = []
    for k in range(float_outputs.shape[1]):
        known = ~np.isnan(y[:, k])
        temperatures.append(fit_finding_temperature(y[known, k] == 1, float_outputs[known, k])
                            if len(np.unique(y[known, k])) == 2 else 1.0)
    return task.temperature_scaled(outputs, temperatures)


def calibration_error(y, probabilities, task):
    """The expected calibration error of calibrated (n, classes) probabilities; for a multi-label model over
    every (image, finding) pair with a known label."""
    from cxr.evaluate.metrics import expected_calibration_error, finding_calibration_error

    return (finding_calibration_error if task.multi_label else expected_calibration_error)(y, probabilities)
