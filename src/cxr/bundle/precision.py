"""The precision a trained model is served at: float32 LiteRT, or int8 LiteRT where it holds up.

At the end of training (`guard_int8`, called by `cxr.bundle.serving.choose`), the model with its population taps is
converted to int8 (`litert.to_int8_flatbuffer`, calibrated on CALIBRATION_IMAGES seeded training images) and checked
on the validation split against float32 (`guard`; with at least MIN_VALIDATION_IMAGES of them). int8 is judged as a
model of its own, calibrated and thresholded on its own outputs, by what a clinician would see: its AUC, its calls
at the operating point, its calibrated probabilities (99th percentile and worst image), its calibration error and
its speed (the tolerances are this module's constants and `fidelity.AUC_TOLERANCE`). When it passes, int8 is what
predict, evaluate, serve and listen run by default (`--precision auto`), and the operating point and the population
check are fitted on its outputs, since those are what will be served. When it fails, the model is served in float32,
and the reason is recorded in class_names.json ("inference") and the model card; a float32 model with several
test-time views may then run the views beyond the first only for the images the first leaves uncertain, if that
passes its own guard (`cxr.bundle.views_on_demand`).
"""

import contextlib
import io

import numpy as np

from cxr.bundle import fidelity
from cxr.bundle.fidelity import speeds
from cxr.bundle.views_on_demand import int8_predictor
from cxr.errors import warn

CALIBRATION_IMAGES = 200
TIMED_IMAGES = 64
MIN_VALIDATION_IMAGES = 100  # fewer, and an AUC difference of 0.002 can't be told from chance


def calibration_rows(train_rows, seed):
    """The seeded training rows int8's activation ranges are calibrated on."""
    count = min(CALIBRATION_IMAGES, len(train_rows))
    return np.sort(np.random.default_rng(seed).choice(train_rows, count, replace=False))


CALL_AGREEMENT = 0.99  # share of validation images (per finding) whose call at the operating point int8 keeps
PROBABILITY_P99 = fidelity.PROBABILITY_TOLERANCE  # calibrated probabilities apart at the 99th percentile, at most
PROBABILITY_MAX = 0.15  # ... and on any single image
ECE_TOLERANCE = 0.01  # int8's expected calibration error above float32's, at most


def converts_int8(requested, n_val):
    """Whether training converts its model to int8 when `requested` (--precision) with `n_val` validation images:
    int8 asked for, or "auto" with enough images to guard it."""
    return requested == "int8" or requested == "auto" and n_val >= MIN_VALIDATION_IMAGES


def guard(y, outputs, served, task, speeds):
    """(passed, record): whether int8 may replace float32 for a model of `task` (`cxr.model.task.Task`), on the
    validation labels `y`, and the numbers that decided it. `outputs`: {"float32": (n, classes), "int8": (n,
    classes)} raw outputs; `served(raw)`: the (calibrated probabilities, calls) of raw outputs at an operating point
    fitted on them, since int8 is served as a model of its own, calibrated and thresholded on its own outputs; `speeds`:
    {"float32": images/s, "int8": images/s}, timed as they will be served.

    int8 passes when its AUC (mean over findings) is within AUC_TOLERANCE of float32's, its calls agree with
    float32's on at least CALL_AGREEMENT of the images (each finding), its calibrated probabilities are within
    PROBABILITY_P99 of float32's at the 99th percentile and PROBABILITY_MAX on every image, its expected calibration
    error is at most ECE_TOLERANCE above float32's, and it is faster: what a clinician sees, rather than the single
    image on which two models differ most."""
    from cxr.evaluate.scoring import scoring

    float_outputs, int8_outputs = outputs["float32"], outputs["int8"]
    scores = scoring(task)
    auc_float, auc_int8 = (scores.auc(y, o) for o in (float_outputs, int8_outputs))
    record = {"validation_images": len(y), "val_auc_float32": auc_float, "val_auc_int8": auc_int8,
              "images_per_second": {k: round(v, 1) for k, v in speeds.items()},
              "tolerances": {"auc": fidelity.AUC_TOLERANCE, "call_agreement": CALL_AGREEMENT,
                             "probability_p99": PROBABILITY_P99, "probability_max": PROBABILITY_MAX,
                             "ece": ECE_TOLERANCE}}
    reasons = []
    if auc_float is None or auc_int8 is None:
        reasons.append("the validation split holds one class, so AUC can't be compared")
    else:
        with contextlib.redirect_stderr(io.StringIO()):  # a finding it can't fit is said once, by training
            (p_float, calls_float), (p_int8, calls_int8) = served(float_outputs), served(int8_outputs)
        difference = np.abs(p_int8 - p_float).ravel()
        agreement = task.agreement(calls_float, calls_int8)
        record |= {"call_agreement": round(agreement, 4),
                   "calibrated_probability_difference": {"p99": round(float(np.percentile(difference, 99)), 4),
                                                         "max": round(float(difference.max()), 4)},
                   "ece_float32": round(scores.calibration_error(y, p_float), 4),
                   "ece_int8": round(scores.calibration_error(y, p_int8), 4)}
        if auc_float - auc_int8 > fidelity.AUC_TOLERANCE:
            reasons.append(f"its validation AUC is {auc_float - auc_int8:.4f} lower than float32's (at most "
                           f"{fidelity.AUC_TOLERANCE} allowed)")
        if agreement < CALL_AGREEMENT:
            reasons.append(f"its calls agree with float32's on {agreement:.1%} of validation images "
                           f"{'(the least agreeing finding) ' if task.multi_label else ''}"
                           f"(at least {CALL_AGREEMENT:.0%} "
                           "needed)")
        p99, largest = (record["calibrated_probability_difference"][k] for k in ("p99", "max"))
        if p99 > PROBABILITY_P99:
            reasons.append(f"its calibrated probabilities differ from float32's by {p99:.3f} at the 99th percentile "
                           f"(at most {PROBABILITY_P99} allowed)")
        if largest > PROBABILITY_MAX:
            reasons.append(f"its calibrated probabilities differ from float32's by up to {largest:.3f} on one image "
                           f"(at most {PROBABILITY_MAX} allowed)")
        if record["ece_int8"] - record["ece_float32"] > ECE_TOLERANCE:
            reasons.append(f"its expected calibration error is {record['ece_int8']:.3f} against float32's "
                           f"{record['ece_float32']:.3f} (at most {ECE_TOLERANCE} more allowed)")
    if speeds["int8"] <= speeds["float32"]:
        reasons.append(f"it is not faster on this machine ({speeds['int8']:.0f} vs {speeds['float32']:.0f} "
                       "images/s)")
    record["reason"] = "; ".join(reasons) if reasons else "passed the guard"
    return not reasons, record


def guard_int8(model, dataset, requested, seed, fit_point=None, calibration=None):
    """(record, int8 flatbuffers or None, {"float32", "int8": (n, classes) validation outputs} or None): `model` (an
    in-memory `SavedModel` whose predictor is float32 LiteRT with every view) converted to int8 (`int8_views`) and
    guarded, with every view, on the validation split of `dataset`; the flatbuffers are given where int8 passes (or
    `requested` is "int8"), and the record says which precision to serve and why. `requested` "float32" skips
    the conversion. `fit_point(y, raw)`: the operating point the run fits on validation outputs (by default the
    Youden threshold on the default positive class); `calibration`: the images to calibrate on instead of the
    seeded training sample (tests make a model fail this way). `cxr.bundle.serving.choose` serves what it
    decides."""
    from cxr.model.inference import predict_outputs

    if requested == "float32" or model.engine != "litert":
        return {"precision": "float32", "engine": model.engine,
                "reason": "float32 asked for" if requested == "float32" else
                f"int8 runs on LiteRT, and this run's predictor is {model.engine}"}, None, None
    rows, y = dataset.split("val")
    if not converts_int8(requested, len(rows)):
        record = {"precision": "float32", "engine": model.engine,
                  "reason": f"too few validation images ({len(rows)}) to check int8 against float32 (at least "
                            f"{MIN_VALIDATION_IMAGES})"}
        print(f"Inference precision: float32 ({record['reason']})", flush=True)
        return record, None, None
    if calibration is None:
        calibration = dataset.images[calibration_rows(dataset.splits["train"], seed)]
    flatbuffers = int8_views(model, calibration)
    int8 = int8_predictor(flatbuffers, model.task)
    classes = len(model.class_names)
    float_outputs = model.raw_outputs(dataset.images, rows)[0]
    int8_outputs = predict_outputs(int8, dataset.images, rows)[:, :classes]  # in batches, as float32's
    timed = dataset.images[rows[:TIMED_IMAGES]]
    rates = speeds({"float32": model.predictor(), "int8": int8}, timed)
    fit_point = fit_point or default_point_fitter(model.task)

    def served(raw):
        return model.task.calibrate(fit_point(y, raw), raw)

    passed, guarded = guard(y, {"float32": float_outputs, "int8": int8_outputs}, served, model.task, rates)
    precision = "int8" if passed or requested == "int8" else "float32"
    record = {"precision": precision, "engine": "litert", "guard": guarded, "reason": guarded["reason"]}
    if precision == "int8" and not passed:
        warn(f"int8 served as asked (--precision int8), although it failed the accuracy guard: {guarded['reason']}")
    print(f"Inference precision: {precision} ({guarded['reason']}; validation AUC float32 "
          f"{_number(guarded['val_auc_float32'])}, int8 {_number(guarded['val_auc_int8'])}, "
          f"{rates['float32']:.0f} vs {rates['int8']:.0f} images/s)", flush=True)
    return record, flatbuffers if precision == "int8" else None, {"float32": float_outputs, "int8": int8_outputs}


def int8_views(model, calibration):
    """{tag: int8 flatbuffer} of `model` (a `SavedModel`), calibrated on `calibration`: one conversion per
    test-time view, so that the views beyond the first can run only where needed, as in float32 ("": the first
    view's, with the population check's taps; "view0.9": another view's); a model of one view, "" alone."""
    from cxr.bundle import litert

    if len(model.test_time_scales) < 2:
        return {"": litert.to_int8_flatbuffer(model.tapped_model(), calibration)}
    first, others = model.view_scales()
    return ({"": litert.to_int8_flatbuffer(model.view_model(first, taps=True), calibration)}
            | {f"view{s:g}": litert.to_int8_flatbuffer(model.view_model(s), calibration) for s in others})


def default_point_fitter(task, positive=None, target_sensitivity=None):
    """fit_point(y, raw) -> the operating point a run fits on validation outputs of a model of `task`
    (`scoring(task).fit_point`)."""
    from cxr.evaluate.scoring import scoring

    scores = scoring(task)
    return lambda y, raw: scores.fit_point(y, raw, positive, target_sensitivity)


def _number(value):
    return "n/a" if value is None else f"{value:.4f}"
