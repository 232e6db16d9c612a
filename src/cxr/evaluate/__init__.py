"""A model and held-out images -> probabilities -> metrics with confidence intervals, calibration, figures.

Nothing here writes files: `evaluate_model` returns numbers, tables and PNG bytes, and `artifacts` saves them.
The operating point (positive class, temperature, threshold) is fitted on validation with
`metrics.fit_operating_point` and only applied here.
"""

from dataclasses import dataclass, field

import numpy as np

from cxr.evaluate import gradcam, plots
from cxr.evaluate.metrics import (auc_score, classification, confidence_intervals, confusion,
                                  expected_calibration_error, headline_metrics, reliability_bins, roc_band)
from cxr.inference import apply_temperature, decide, predict_probabilities

GALLERY_SIZE = 4


@dataclass
class Evaluation:
    metrics: dict  # summary.json's "metrics": point values (None where undefined)
    confidence_intervals: dict  # {metric: [low, high]}
    calibration: dict
    classification: dict  # scikit-learn's report at the operating point
    probabilities: np.ndarray  # calibrated
    raw_probabilities: np.ndarray  # the model's softmax, before temperature scaling
    predictions: np.ndarray  # class index per image at the operating point
    figures: dict = field(default_factory=dict)  # {name: PNG bytes}


def evaluate_model(model, images, rows, y_true, class_names, operating_point, n_bootstrap=2000, seed=0, tta=False,
                   names=None, batch_size=32, predictor=None):
    """Everything the reports need about `model` on `images[rows]` with labels `y_true`.

    `predictor` (default: `model`) computes the probabilities, e.g. `litert.fast_inference(model)`; Grad-CAM
    needs gradients, so it always runs on `model`.
    """
    raw = predict_probabilities(predictor or model, images, rows, batch_size, tta)
    probabilities = apply_temperature(raw, operating_point["temperature"])
    positive = class_names.index(operating_point["positive_class"])
    threshold = operating_point["threshold"]
    y_pred = decide(probabilities, positive, threshold)
    report = classification(y_true, y_pred, class_names)
    headline = headline_metrics(y_true, probabilities, class_names, positive, threshold)
    values = {
        **{k: _finite_or_none(v) for k, v in headline.items()},
        "auc": auc_score(y_true, probabilities, len(class_names)),
        "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in class_names},
        "confusion_matrix": confusion(y_true, y_pred, len(class_names)).tolist(),
        "n_images": int(len(y_true)),
    }
    calibration = {"temperature": operating_point["temperature"],
                   "ece_before": expected_calibration_error(y_true, raw), "ece_after": headline["ece"]}
    evaluation = Evaluation(values, confidence_intervals(y_true, probabilities, class_names, positive, threshold,
                                                         n_bootstrap, seed),
                            calibration, report, probabilities, raw, y_pred)
    evaluation.figures = figures(model, images, rows, y_true, evaluation, class_names, positive, threshold,
                                 n_bootstrap, seed, names)
    return evaluation


def figures(model, images, rows, y_true, evaluation, class_names, positive, threshold, n_bootstrap, seed,
            names=None):
    """The evaluation's plots as {name: PNG bytes}, in the order the report shows them."""
    probabilities, intervals = evaluation.probabilities, evaluation.confidence_intervals
    raw, y_pred = evaluation.raw_probabilities, evaluation.predictions
    binary = len(class_names) == 2
    curves = []
    for c in ([positive] if binary else range(len(class_names))):
        is_positive = y_true == c
        if not 0 < is_positive.sum() < len(y_true):
            continue
        prefix = "" if binary else f"{class_names[c]} "
        curves.append({"name": class_names[c], "is_positive": is_positive, "scores": probabilities[:, c],
                       "auc": evaluation.metrics.get(f"{prefix}auc_roc"), "auc_ci": intervals.get(f"{prefix}auc_roc"),
                       "ap": evaluation.metrics.get(f"{prefix}auc_pr"), "ap_ci": intervals.get(f"{prefix}auc_pr"),
                       "band": roc_band(is_positive, probabilities[:, c], min(n_bootstrap, 500), seed)
                       if n_bootstrap else None})
    result = {}
    if curves:
        point = None
        if binary and evaluation.metrics["sensitivity"] is not None and evaluation.metrics["specificity"] is not None:
            point = (1 - evaluation.metrics["specificity"], evaluation.metrics["sensitivity"],
                     f"operating point (threshold {threshold:.3f})")
        result["roc"] = plots.figure_png(plots.roc_figure(curves, point))
        result["pr"] = plots.figure_png(plots.pr_figure(curves))
    result["reliability"] = plots.figure_png(plots.reliability_figure(
        (f"before scaling (ECE {evaluation.calibration['ece_before']:.3f})", *reliability_bins(y_true, raw)),
        (f"after, T = {evaluation.calibration['temperature']:.2f} (ECE {evaluation.calibration['ece_after']:.3f})",
         *reliability_bins(y_true, probabilities))))
    result["confusion_matrix"] = plots.figure_png(plots.confusion_matrix_figure(
        evaluation.metrics["confusion_matrix"], class_names))
    result["gradcam_gallery"] = plots.figure_png(gallery(model, images, rows, y_true, y_pred, probabilities,
                                                         class_names, positive, names))
    return result


def gallery(model, images, rows, y_true, y_pred, probabilities, class_names, positive, names=None):
    """Grad-CAM for the most confident true positives, false positives and false negatives of the positive class.

    Each map explains the class the model predicted: what it saw when it made that call.
    """
    p = probabilities[:, positive]
    name = class_names[positive]
    is_positive, said_positive = y_true == positive, y_pred == positive
    groups = [("true positives", np.flatnonzero(is_positive & said_positive), -p),
              ("false positives", np.flatnonzero(~is_positive & said_positive), -p),
              ("false negatives", np.flatnonzero(is_positive & ~said_positive), p)]
    picked = [(title, idx[np.argsort(order[idx], kind="stable")][:GALLERY_SIZE]) for title, idx, order in groups]
    chosen = np.concatenate([idx for _, idx in picked]).astype(int)
    rows = np.asarray(rows)
    pictures = np.asarray(images[rows[chosen]])
    maps = gradcam.heatmaps(model, pictures, y_pred[chosen]) if len(chosen) else []
    grid, k = [], 0
    for title, idx in picked:
        items = []
        for i in idx:
            label = f"{names[i]}\n" if names is not None else ""
            items.append((gradcam.overlay(pictures[k], maps[k]), f"{label}p({name}) = {p[i]:.3f}"))
            k += 1
        grid.append((title, items))
    return plots.gallery_figure(grid, f"Grad-CAM, positive class {name} (most confident first)")


def _finite_or_none(value):
    return float(value) if value is not None and np.isfinite(value) else None
