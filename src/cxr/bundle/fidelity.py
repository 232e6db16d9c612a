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


def calibrated(y, float_outputs, outputs, task):
    """`outputs` at the temperature(s) fitted on the float32 outputs `float_outputs` of the same images, by a
    model of `task` (`cxr.model.task.Task`)."""
    from cxr.evaluate.scoring import scoring

    return task.temperature_scaled(outputs, scoring(task).temperatures(y, float_outputs))
