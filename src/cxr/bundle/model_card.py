"""What a saved model is, for the people and programs that use it: `cxr serve`'s `/v1/model` and the
`model-card.json` of every export (in the spirit of a MONAI bundle's metadata.json).

Starts from the artifacts: the `SavedModel` and, when it describes this very model, the `reports/summary.json`
of the run that wrote it.
"""

import json
from pathlib import Path

from cxr.evaluate.report import package_version
from cxr.model.inference import describe_fitted_on

INTENDED_USE = ("Research and decision support: flags chest X-rays for a clinician's review. It was trained on one "
                "data set; measure it on your own site's images (cxr evaluate) and refit its operating point "
                "(cxr calibrate) before relying on it.")
LIMITS = [
    "Not a substitute for the judgement of a radiologist or clinician, and not a medical device.",
    "Trained only on the classes listed; any other finding or condition is outside what it can say.",
    "Expects frontal chest X-rays; lateral views, other body parts, photographs and screenshots give "
    "meaningless answers.",
    "Its accuracy at another hospital is usually lower than on the test split of its own data set.",
]
HEADLINE = ("sensitivity", "specificity", "auc_roc", "auc_pr", "accuracy", "balanced_accuracy", "ppv", "npv",
            "brier", "ece", "n_images")
MULTI_LABEL_HEADLINE = ("mean_auc", "mean_auc_pr", "mean sensitivity", "mean specificity", "per_finding")



def training_record(model):
    """From the summary.json of the run that wrote `model`: its data counts, metrics and CIs, or None.

    Looked for at models/../reports/summary.json; used only when its operating point is the model's own (a
    copy refitted by `cxr calibrate` has its own reports).
    """
    if model.path is None:
        return None
    path = model.path.parent.parent / "reports" / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        point = summary["operating_point"]
        same = all(point.get(k) == model.operating_point.get(k)
                   for k in ("threshold", "temperature", "positive_class", "findings"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not same:
        return None
    if "history" in summary:
        evaluated = "the held-out test split of the training run"
    else:
        evaluated = f"a labelled folder ({summary.get('config', {}).get('data_dir', 'unrecorded')}) after training"
    metrics = summary.get("metrics", {})
    return {"evaluated_on": evaluated, "counts": summary.get("counts"),
            "metrics": {k: metrics[k] for k in (*HEADLINE, *MULTI_LABEL_HEADLINE) if k in metrics},
            "confidence_intervals": {k: v for k, v in summary.get("confidence_intervals", {}).items()
                                     if k in HEADLINE or k in MULTI_LABEL_HEADLINE
                                     or k.endswith((" auc_roc", " sensitivity", " specificity"))},
            "subgroups": subgroup_record(summary.get("subgroups") or {}),
            "cautions": summary.get("cautions") or [],  # numbers that rest on fewer than 20 positives or negatives
            "trained_with": summary.get("versions")}


def subgroup_record(subgroups):
    """Which subgroups the evaluated images covered (images per group) and the gaps found between them."""
    return {attribute: {"images": {g: v["n_images"] for g, v in entry["groups"].items()},
                        "gaps": entry["gaps"]} for attribute, entry in subgroups.items()}


def population_record(model):
    """The population check in words and numbers, or why the model has none."""
    from cxr.model.population import POPULATION_FILE

    if model.population is None:
        return {"available": False, "note": model.population_note}
    return {"available": True, "file": POPULATION_FILE, **model.population.describe(),
            "answer": "every prediction carries in_distribution (false: the image is unlike the training images and "
                      "its result is not reliable), population_score and population_percentile (the share of "
                      "validation images scoring at most as much)",
            "promise": "catches other populations (adults for a pediatric model), images that are not chest X-rays, "
                       "inverted, rotated or heavily cropped X-rays; a shift inside the training population (another "
                       "device or hospital for the same age group) may not be caught",
            "exports": "exported files give the model's outputs only: the check runs in cxr (predict, serve)"}


def views_note(scales):
    """'' for a one-view model; else a sentence saying that the model averages zoomed views itself."""
    if list(scales) == [1.0]:
        return ""
    return (f"; the model itself averages {len(scales)} views of each image, zoomed by "
            f"{', '.join(f'{s:g}' for s in scales)} (below 1 inside a black frame)")


def describe(model):
    """A JSON-ready description of a `SavedModel`: input, outputs, operating point, training data and test
    metrics (None where no summary.json describes this model), intended use, limits and versions."""
    point = dict(model.operating_point)
    return {
        "model_sha256": model.sha256,
        "class_names": model.class_names,
        "img_size": model.img_size,
        "backbone": model.backbone,
        "input": {"shape": [None, model.img_size, model.img_size, 3], "dtype": "float32",
                  "value_range": [0, 255], "channel_order": "RGB",
                  "preprocessing": "inside the model (ImageNet normalisation); give raw pixel values resized to "
                                   f"{model.img_size} x {model.img_size}, grey X-rays repeated into three channels"
                                   + views_note(model.test_time_scales)},
        "test_time_scales": model.test_time_scales,
        "outputs": {"class_names": model.class_names, "activation": model.task.activation,
                    "calibration": model.task.calibration_rule(point)},
        "operating_point": point | {"fitted_on_description": describe_fitted_on(point)},
        "decision_rule": decision_rule(point, model.class_names),
        "population_check": population_record(model),
        "inference": inference_record(model),
        "training": training_record(model),
        "intended_use": INTENDED_USE,
        "limits": LIMITS,
        "versions": {"cxr": package_version("cxr"), "tensorflow": package_version("tensorflow", "tensorflow-cpu")},
    }


def without_local_paths(card):
    """`card` for other machines (`cxr serve`'s /v1/model): the folders the operating point was fitted on, given by
    their names, not as paths on this server."""
    fitted = card.get("operating_point", {}).get("fitted_on") or {}
    folders = [fitted.get("data_dir"), *fitted.get("same_data", [])]
    names = {f: Path(f).name for f in sorted(filter(None, folders), key=len, reverse=True)}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str):
            for folder, name in names.items():
                value = value.replace(folder, name)
        return value

    return strip(card)


def inference_record(model):
    """Which engine, precision and views cxr serves the model with, and why (training's int8 accuracy guard and
    its guard of the views on demand)."""
    chosen = model.inference or {"precision": "float32", "reason": "trained before cxr had int8"}
    return chosen | {"served": model.plan.describe(len(model.test_time_scales)), "asked": model.plan.asked}


def decision_rule(point, class_names):
    """The operating point in words: how a label follows from the calibrated probabilities; for a multi-label
    model {finding: its rule}."""
    if "findings" in point:
        return {name: f"{name} when its calibrated probability >= {p['threshold']:.4f} (threshold chosen by "
                      f"{p.get('method', 'an unrecorded rule')})" for name, p in point["findings"].items()}
    if point.get("threshold") is None or len(class_names) != 2:
        return "the class with the highest probability"
    negative = next(n for n in class_names if n != point["positive_class"])
    return (f"{point['positive_class']} when its calibrated probability >= {point['threshold']:.4f}, else {negative} "
            f"(threshold chosen by {point.get('method', 'an unrecorded rule')})")

