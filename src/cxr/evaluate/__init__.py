"""A model and held-out images -> probabilities -> metrics with confidence intervals, calibration, figures.

Nothing here writes files: `evaluate_model` returns numbers, tables and PNG bytes, and `artifacts` saves them.
The operating point (positive class, temperature, threshold) is fitted on validation with
`metrics.fit_operating_point`, stored in the `SavedModel`, and only applied here.
"""

from dataclasses import dataclass, field

import numpy as np

from cxr.evaluate import gradcam, plots
from cxr.evaluate.metrics import (auc_score, classification, confidence_intervals, confusion,
                                  expected_calibration_error, headline_metrics, reliability_bins, roc_band)
from cxr.evaluate.shortcuts import shortcut_check

GALLERY_SIZE = 4


@dataclass
class EvaluationOptions:
    bootstrap: int = 2000  # resamples for the confidence intervals; 0: none
    seed: int = 0  # of the bootstrap
    tta: bool = False  # average each image's probabilities with its mirror image's
    batch_size: int = 32


@dataclass
class Evaluation:
    class_names: list
    operating_point: dict  # as saved with the model: positive class, temperature, threshold, method, ...
    metrics: dict  # summary.json's "metrics": point values (None where undefined)
    confidence_intervals: dict  # {metric: [low, high]}
    calibration: dict
    classification: dict  # scikit-learn's report at the operating point
    probabilities: np.ndarray  # (n, classes) calibrated
    raw_probabilities: np.ndarray  # (n, classes) the model's softmax, before temperature scaling
    predictions: np.ndarray  # (n,) class index per image at the operating point
    figures: dict = field(default_factory=dict)  # {name: PNG bytes}
    shortcuts: dict = field(default_factory=dict)  # evaluate.shortcuts.shortcut_check's result


def evaluate_model(model, dataset, split, options):
    """Everything the reports need about `model` (a `SavedModel`) on `dataset`'s split `split`.

    The probabilities come from `model.predictor()` (LiteRT or Keras); Grad-CAM needs gradients, so the
    gallery runs on the Keras model.
    """
    rows, y_true = dataset.split(split)
    raw = model.raw_probabilities(dataset.images, rows, options.batch_size, options.tta)
    probabilities, y_pred = model.calibrate(raw)
    class_names, positive = model.class_names, model.positive_index
    threshold = model.operating_point["threshold"]
    report = classification(y_true, y_pred, class_names)
    def metrics_of(rows):
        return headline_metrics(y_true[rows], probabilities[rows], class_names, positive, threshold)

    headline = metrics_of(np.arange(len(y_true)))
    values = {
        **{k: _finite_or_none(v) for k, v in headline.items()},
        "auc": auc_score(y_true, probabilities, len(class_names)),
        "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in class_names},
        "confusion_matrix": confusion(y_true, y_pred, len(class_names)).tolist(),
        "n_images": int(len(y_true)),
    }
    calibration = {"temperature": model.operating_point["temperature"],
                   "ece_before": expected_calibration_error(y_true, raw), "ece_after": headline["ece"]}
    intervals = confidence_intervals(metrics_of, y_true, options.bootstrap, options.seed)
    evaluation = Evaluation(class_names, model.operating_point, values, intervals, calibration, report,
                            probabilities, raw, y_pred)
    evaluation.shortcuts = shortcut_check(model, dataset.images, rows, y_true, options.seed, options.batch_size)
    evaluation.figures = figures(model, dataset, split, evaluation, options)
    return evaluation


def figures(model, dataset, split, evaluation, options):
    """The evaluation's plots as {name: PNG bytes}, in the order the report shows them."""
    _, y_true = dataset.split(split)
    class_names, positive = model.class_names, model.positive_index
    probabilities, intervals = evaluation.probabilities, evaluation.confidence_intervals
    raw = evaluation.raw_probabilities
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
                       "band": roc_band(is_positive, probabilities[:, c], min(options.bootstrap, 500), options.seed)
                       if options.bootstrap else None})
    result = {}
    if curves:
        point = None
        if binary and evaluation.metrics["sensitivity"] is not None and evaluation.metrics["specificity"] is not None:
            threshold = evaluation.operating_point["threshold"]
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
    result["gradcam_gallery"] = plots.figure_png(gallery(model, dataset, split, evaluation))
    return result


def gallery(model, dataset, split, evaluation):
    """Grad-CAM for the most confident true positives, false positives and false negatives of the positive class.

    Each map explains the class the model predicted: what it saw when it made that call.
    """
    rows, y_true = dataset.split(split)
    positive, y_pred = model.positive_index, evaluation.predictions
    p = evaluation.probabilities[:, positive]
    name = model.class_names[positive]
    names = dataset.names(rows)
    is_positive, said_positive = y_true == positive, y_pred == positive
    groups = [("true positives", np.flatnonzero(is_positive & said_positive), -p),
              ("false positives", np.flatnonzero(~is_positive & said_positive), -p),
              ("false negatives", np.flatnonzero(is_positive & ~said_positive), p)]
    picked = [(title, idx[np.argsort(order[idx], kind="stable")][:GALLERY_SIZE]) for title, idx, order in groups]
    chosen = np.concatenate([idx for _, idx in picked]).astype(int)
    pictures = np.asarray(dataset.images[rows[chosen]])
    maps = gradcam.heatmaps(model.keras_model, pictures, y_pred[chosen]) if len(chosen) else []
    grid, k = [], 0
    for title, idx in picked:
        items = []
        for i in idx:
            items.append((gradcam.overlay(pictures[k], maps[k]), f"{names[i]}\np({name}) = {p[i]:.3f}"))
            k += 1
        grid.append((title, items))
    return plots.gallery_figure(grid, f"Grad-CAM, positive class {name} (most confident first)")


def _finite_or_none(value):
    return float(value) if value is not None and np.isfinite(value) else None
