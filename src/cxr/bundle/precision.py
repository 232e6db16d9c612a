"""The precision a trained model is served at: float32 LiteRT, or int8 LiteRT where it holds up.

At the end of training (`choose`), the model with its population taps is converted to int8
(`litert.to_int8_flatbuffer`, calibrated on CALIBRATION_IMAGES seeded training images) and checked on the
validation split against float32 (`guard`; with at least MIN_VALIDATION_IMAGES of them; the tolerances are `fidelity`'s): int8 must be faster, its AUC within AUC_TOLERANCE of float32's and
its calibrated probabilities within PROBABILITY_TOLERANCE of float32's on every validation image. When it passes,
int8 is what predict, evaluate, serve and listen run by default (`--precision auto`), and the operating point
and the population check are fitted on its outputs, since those are what will be served. When it fails, the
model is served in float32, and the reason is recorded in class_names.json ("inference") and the model card;
a float32 model with several test-time views may then run the views beyond the first only for the images the
first leaves uncertain, if that passes its own guard (`cxr.bundle.views_on_demand`).
"""

import numpy as np

from cxr.bundle import fidelity
from cxr.bundle.fidelity import calibrated, images_per_second, mean_auc
from cxr.errors import warn

PRECISIONS = ("auto", "float32", "int8")
INT8_FILE = "model.int8.tflite"
CALIBRATION_IMAGES = 200
TIMED_IMAGES = 64
MIN_VALIDATION_IMAGES = 100  # fewer, and an AUC difference of 0.002 can't be told from chance


def calibration_rows(train_rows, seed):
    """The seeded training rows int8's activation ranges are calibrated on."""
    count = min(CALIBRATION_IMAGES, len(train_rows))
    return np.sort(np.random.default_rng(seed).choice(train_rows, count, replace=False))


def guard(y, float_outputs, int8_outputs, multi_label, speeds):
    """(passed, record): whether int8 outputs (n, classes) may replace float32's on the validation labels `y`,
    and the numbers that decided it. `speeds`: {"float32": images/s, "int8": images/s}."""
    num_classes = float_outputs.shape[1]
    auc_float, auc_int8 = (mean_auc(y, o, multi_label, num_classes) for o in (float_outputs, int8_outputs))
    difference = float(np.max(np.abs(calibrated(y, float_outputs, int8_outputs, multi_label)
                                      - calibrated(y, float_outputs, float_outputs, multi_label))))
    record = {"validation_images": len(y), "val_auc_float32": auc_float, "val_auc_int8": auc_int8,
              "max_calibrated_probability_difference": round(difference, 4),
              "images_per_second": {k: round(v, 1) for k, v in speeds.items()},
              "auc_tolerance": fidelity.AUC_TOLERANCE, "probability_tolerance": fidelity.PROBABILITY_TOLERANCE}
    reasons = []
    if auc_float is None or auc_int8 is None:
        reasons.append("the validation split holds one class, so AUC can't be compared")
    elif auc_float - auc_int8 > fidelity.AUC_TOLERANCE:
        reasons.append(f"its validation AUC is {auc_float - auc_int8:.4f} lower than float32's (at most "
                       f"{fidelity.AUC_TOLERANCE} allowed)")
    if difference > fidelity.PROBABILITY_TOLERANCE:
        reasons.append(f"its calibrated probabilities differ from float32's by up to {difference:.3f} (at most "
                       f"{fidelity.PROBABILITY_TOLERANCE} allowed)")
    if speeds["int8"] <= speeds["float32"]:
        reasons.append(f"it is not faster on this machine ({speeds['int8']:.0f} vs {speeds['float32']:.0f} "
                       "images/s)")
    record["reason"] = "; ".join(reasons) if reasons else "passed the guard"
    return not reasons, record


def choose(model, dataset, requested, seed, calibration=None):
    """Convert `model` (an in-memory `SavedModel` whose predictor is float32 LiteRT) to int8, guard it on the
    validation split of `dataset` and, when it passes (or `requested` is "int8"), make int8 the model's
    predictor. Records the choice in `model.inference`; `requested` "float32" skips the conversion.
    `calibration`: the images to calibrate on instead of the seeded training sample (tests make a model fail
    this way)."""
    from cxr.bundle import litert
    from cxr.model.inference import predict_outputs

    if requested == "float32" or model.engine != "litert":
        model.inference = {"precision": "float32", "engine": model.engine,
                           "reason": "float32 asked for" if requested == "float32" else
                           f"int8 runs on LiteRT, and this run's predictor is {model.engine}"}
        return model.inference
    rows, y = dataset.split("val")
    if requested == "auto" and len(rows) < MIN_VALIDATION_IMAGES:
        model.inference = {"precision": "float32", "engine": model.engine,
                           "reason": f"too few validation images ({len(rows)}) to check int8 against float32 (at "
                                     f"least {MIN_VALIDATION_IMAGES})"}
        print(f"Inference precision: float32 ({model.inference['reason']})", flush=True)
        return model.inference
    if calibration is None:
        calibration = dataset.images[calibration_rows(dataset.splits["train"], seed)]
    flatbuffer = litert.to_int8_flatbuffer(model.tapped_model(), calibration)
    int8 = litert.LiteRTModel(flatbuffer)
    classes = len(model.class_names)
    float_outputs = model.raw_outputs(dataset.images, rows)[0]
    int8_outputs = predict_outputs(int8, dataset.images, rows)[:, :classes]  # in batches, as float32's
    timed = dataset.images[rows[:TIMED_IMAGES]]
    speeds = {"float32": images_per_second(model.predictor(), timed), "int8": images_per_second(int8, timed)}
    passed, record = guard(y, float_outputs, int8_outputs, model.multi_label, speeds)
    precision = "int8" if passed or requested == "int8" else "float32"
    model.inference = {"precision": precision, "engine": "litert"} | {"guard": record, "reason": record["reason"]}
    if precision == "int8":
        model.use_int8(flatbuffer)
        if not passed:
            warn(f"int8 served as asked (--precision int8), although it failed the accuracy guard: {record['reason']}")
    print(f"Inference precision: {precision} ({record['reason']}; validation AUC float32 "
          f"{_number(record['val_auc_float32'])}, int8 {_number(record['val_auc_int8'])}, "
          f"{speeds['float32']:.0f} vs {speeds['int8']:.0f} images/s)", flush=True)
    if precision == "float32" and requested == "auto" and len(model.test_time_scales) > 1:
        from cxr.bundle import views_on_demand

        model.inference["views_on_demand"] = views_on_demand.choose(model, dataset, rows, y, float_outputs)
    return model.inference


def _number(value):
    return "n/a" if value is None else f"{value:.4f}"
