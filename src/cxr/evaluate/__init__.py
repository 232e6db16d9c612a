"""A model and held-out images -> probabilities -> metrics with confidence intervals, calibration, figures.

Nothing here writes files: `evaluate_model` returns numbers, tables and PNG bytes, and `artifacts` saves them.
The operating point (positive class, temperature, threshold) is fitted on validation with
`metrics.fit_operating_point`, stored in the `SavedModel`, and only applied here.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cxr.evaluate import gradcam, plots
from cxr.errors import warn
from cxr.evaluate.metrics import (FINDING_METRICS, auc_score, classification, confidence_intervals, confusion,
                                  expected_calibration_error, finding_calibration_error, finding_counts,
                                  few_cases, finding_metrics, headline_metrics, probability_bins,
                                  proportion_intervals, reliability_bins, roc_band)
from cxr.evaluate.scoring import scoring
from cxr.evaluate.shortcuts import shortcut_check
from cxr.evaluate.subgroups import AGE_BANDS, Scored, groups_of, subgroup_analysis
from cxr.model.task import Classes, Findings, Task

SUBGROUP_RESAMPLES = 500  # at most: every group of every attribute is recomputed on each draw

GALLERY_SIZE = 4


@dataclass
class EvaluationOptions:
    bootstrap: int = 2000  # resamples for the confidence intervals; 0: none
    seed: int = 0  # of the bootstrap
    tta: bool = False  # average each image's probabilities with its mirror image's
    batch_size: int = 32
    subgroups: tuple = ()  # metadata columns reported by subgroup besides sex, age, view and device
    age_bands: tuple = AGE_BANDS


@dataclass
class Evaluation:
    task: Task  # the model's class names and what they are (`cxr.model.task`)
    operating_point: dict  # as saved with the model: positive class, temperature, threshold, method, ...
    metrics: dict  # summary.json's "metrics": point values (None where undefined)
    confidence_intervals: dict  # {metric: [low, high]}
    calibration: dict
    classification: dict  # scikit-learn's report at the operating point
    probabilities: np.ndarray  # (n, classes) calibrated
    raw_probabilities: np.ndarray  # (n, classes) the model's softmax (sigmoid), before temperature scaling
    predictions: np.ndarray  # (n,) class index per image at the operating point; (n, findings) 0/1 multi-label
    figures: dict = field(default_factory=dict)  # {name: PNG bytes}
    shortcuts: dict = field(default_factory=dict)  # evaluate.shortcuts.shortcut_check's result
    subgroups: dict = field(default_factory=dict)  # evaluate.subgroups.subgroup_analysis's; {} without metadata
    population: dict = field(default_factory=dict)  # population_summary's: the check's flags and metrics without them
    in_distribution: np.ndarray = None  # (n,) bool, the population check's answer per image; None without a check
    cautions: list = field(default_factory=list)  # numbers resting on few positives or negatives, in words

    @property
    def class_names(self):
        return list(self.task.class_names)


def evaluate_model(model, dataset, split, options):
    """Everything the reports need about `model` (a `SavedModel`) on `dataset`'s split `split`: its task's
    evaluation (`evaluate_classes` or `evaluate_findings`).

    The probabilities come from `model.predictor()` (LiteRT or Keras); Grad-CAM needs gradients, so the
    gallery runs on the Keras model.
    """
    evaluate = {Classes: evaluate_classes, Findings: evaluate_findings}[type(model.task)]
    return evaluate(model, dataset, split, options)


def evaluate_classes(model, dataset, split, options):
    """`evaluate_model` for a model of exclusive classes: the headline metrics of the positive class (binary) or
    per class, with stratified bootstrap intervals, the confusion matrix and the classification report."""
    rows, y_true = dataset.split(split)
    raw, features = model.raw_outputs(dataset.images, rows, options.batch_size, options.tta)
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
    # sensitivity, specificity, PPV and NPV get exact intervals of their proportions, not the bootstrap's
    if len(class_names) == 2:
        intervals |= proportion_intervals(y_true == positive, y_pred == positive)
        cautions = [few_cases(y_true == positive)]
    else:
        for c, name in enumerate(class_names):
            intervals |= proportion_intervals(y_true == c, y_pred == c, prefix=f"{name} ")
        cautions = [few_cases(y_true == c, name) for c, name in enumerate(class_names)]
    evaluation = Evaluation(model.task, model.operating_point, values, intervals, calibration, report,
                            probabilities, raw, y_pred, cautions=[c for c in cautions if c])
    return with_checks(evaluation, model, dataset, split, options, Checks(features, metrics_of, figures))


@dataclass(frozen=True)
class Checks:
    """What the checks after the headline numbers need from one kind of evaluation: the images' population
    features ((n, features)), `metrics_of(rows)` (the headline metrics of those images) and `figures(model,
    dataset, split, evaluation, options)` (its PNGs)."""
    features: np.ndarray
    metrics_of: Callable
    figures: Callable


def with_checks(evaluation, model, dataset, split, options, checks):
    """`evaluation` with its population check, shortcut check, subgroup analysis and figures added (`checks`)."""
    rows, y = dataset.split(split)
    check = model.check_population(checks.features)
    evaluation.population = population_summary(check, checks.metrics_of, model)
    evaluation.in_distribution = None if check is None else check.in_distribution
    evaluation.shortcuts = shortcut_check(model, dataset.images, rows, y, options.seed, options.batch_size)
    evaluation.subgroups = subgroups(model, dataset, split, evaluation, options)
    evaluation.figures = checks.figures(model, dataset, split, evaluation, options)
    return evaluation


POPULATION_METRICS = ("auc_roc", "sensitivity", "specificity", "accuracy", "balanced_accuracy", "mean_auc",
                      "mean sensitivity", "mean specificity", "macro auc_roc", "ece")


def population_summary(check, metrics_of, model):
    """How many evaluated images the population check flagged, and the headline metrics on all of them and on
    the unflagged ones; {"available": False, ...} for a model without a check."""
    if check is None:
        return {"available": False, "note": model.population_note}
    n = len(check.in_distribution)
    kept = np.flatnonzero(check.in_distribution)

    def headline(sample):
        if not len(sample):
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a subset may lack a class: its metrics are None
            return {k: _finite_or_none(v) for k, v in metrics_of(sample).items() if k in POPULATION_METRICS}

    return {"available": True, "n_images": n, "flagged": check.flagged, "flagged_share": check.flagged / n if n else 0.0,
            **model.population.describe(), "metrics_all": headline(np.arange(n)), "metrics_in_distribution": headline(kept)}


def subgroups(model, dataset, split, evaluation, options):
    """The subgroup analysis of the evaluated images (`evaluate.subgroups`), at the saved operating point."""
    rows, y = dataset.split(split)
    groups = groups_of(dataset.metadata, rows, options.subgroups, options.age_bands)
    scored = Scored(y, evaluation.probabilities, evaluation.predictions, model.task, model.positive_index)
    return subgroup_analysis(groups, scored, dataset.patients(rows), min(options.bootstrap, SUBGROUP_RESAMPLES),
                             options.seed) if groups else {}


def evaluate_findings(model, dataset, split, options):
    """`evaluate_model` for a multi-label model: every finding on its known labels, at its own threshold, with
    patient-level bootstrap intervals, and the mean AUC over findings.

    `metrics` holds "mean_auc" (also as "auc"), "mean_auc_pr", the mean sensitivity etc., "ece" and
    "per_finding": {finding: {auc_roc, auc_pr, sensitivity, specificity, ppv, npv, f1, brier, threshold,
    n_known, n_positive, prevalence, status}}; `confidence_intervals` "<finding> auc_roc" etc. and "mean_auc".
    """
    rows, labels = dataset.split(split)
    raw, features = model.raw_outputs(dataset.images, rows, options.batch_size, options.tta)
    probabilities, called = model.calibrate(raw)
    findings = model.class_names

    def metrics_of(sample):
        return finding_metrics(labels[sample], probabilities[sample], called[sample], findings)

    flat = metrics_of(np.arange(len(rows)))
    counts = finding_counts(labels, findings)
    one_class = [f"{f} ({c['status']})" for f, c in counts.items() if c["status"] != "ok"]
    if one_class:
        warn(f"findings with one class only in the evaluated images, whose AUC is undefined and reported as "
             f"null: {', '.join(one_class)}")
    thresholds = model.finding_points("threshold")
    per_finding = {f: {m: _finite_or_none(flat[f"{f} {m}"]) for m in FINDING_METRICS} | {"threshold": t} | counts[f]
                   for f, t in zip(findings, thresholds)}
    means = {k: _finite_or_none(v) for k, v in flat.items() if k.startswith("mean") or k == "ece"}
    values = means | {"auc": means["mean_auc"], "per_finding": per_finding, "n_images": int(len(rows))}
    calibration = {"temperature": None, "temperatures": dict(zip(findings, model.finding_points("temperature"))),
                   "ece_before": finding_calibration_error(labels, raw), "ece_after": flat["ece"]}
    intervals = confidence_intervals(metrics_of, labels, options.bootstrap, options.seed,
                                     patients=dataset.patients(rows))
    cautions = []
    for k, finding in enumerate(findings):  # exact intervals of each finding's proportions, on its known labels
        known = ~np.isnan(labels[:, k])
        intervals |= proportion_intervals(labels[known, k] == 1, called[known, k] == 1, prefix=f"{finding} ")
        cautions.append(few_cases(labels[known, k] == 1, finding))
    report = {f: {"precision": v["ppv"] or 0.0, "recall": v["sensitivity"] or 0.0, "f1-score": v["f1"] or 0.0,
                  "support": v["n_positive"]} for f, v in per_finding.items()}
    report["macro avg"] = {k: float(np.mean([report[f][k] for f in findings])) for k in ("precision", "recall",
                                                                                         "f1-score")}
    report["macro avg"]["support"] = sum(report[f]["support"] for f in findings)
    evaluation = Evaluation(model.task, model.operating_point, values, intervals, calibration, report,
                            probabilities, raw, called, cautions=[c for c in cautions if c])
    return with_checks(evaluation, model, dataset, split, options, Checks(features, metrics_of, finding_figures))


def finding_figures(model, dataset, split, evaluation, options):
    """A multi-label evaluation's plots: an ROC panel per finding, reliability over (image, finding) pairs,
    and the Grad-CAM gallery."""
    _, labels = dataset.split(split)
    probabilities, intervals = evaluation.probabilities, evaluation.confidence_intervals
    curves = []
    for k, name in enumerate(model.class_names):
        numbers = evaluation.metrics["per_finding"][name]
        if numbers["status"] != "ok":
            continue
        known = ~np.isnan(labels[:, k])
        is_positive, scores = labels[known, k] == 1, probabilities[known, k]
        point = ((1 - numbers["specificity"], numbers["sensitivity"])
                 if numbers["sensitivity"] is not None and numbers["specificity"] is not None else None)
        curves.append({"name": name, "is_positive": is_positive, "scores": scores, "auc": numbers["auc_roc"],
                       "auc_ci": intervals.get(f"{name} auc_roc"), "point": point,
                       "band": roc_band(is_positive, scores, min(options.bootstrap, 200), options.seed)
                       if options.bootstrap else None})
    result = {}
    if curves:
        result["roc"] = plots.figure_png(plots.roc_grid_figure(curves, f"ROC curve per finding ({data_name(split)})"))
    known = ~np.isnan(labels)
    if known.any():
        calibration = evaluation.calibration
        result["reliability"] = plots.figure_png(plots.reliability_figure(
            (f"before scaling (ECE {calibration['ece_before']:.3f})",
             *probability_bins(labels[known] == 1, evaluation.raw_probabilities[known])),
            (f"after, a temperature per finding (ECE {calibration['ece_after']:.3f})",
             *probability_bins(labels[known] == 1, probabilities[known])),
            title=f"Reliability over every (image, finding) pair ({data_name(split)})"))
    if evaluation.subgroups:
        result["subgroups"] = plots.figure_png(plots.forest_figure(evaluation.subgroups, overall(evaluation.metrics)))
    result["gradcam_gallery"] = plots.figure_png(gallery(model, dataset, split, evaluation))
    return result


def data_name(split):
    """The evaluated split in words, for figure titles."""
    return {"test": "test split", "evaluated": "evaluated images", "calibration": "calibration sample"}.get(
        split, f"{split} split")


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
        result["roc"] = plots.figure_png(plots.roc_figure(curves, point, f"ROC curve ({data_name(split)})"))
        result["pr"] = plots.figure_png(plots.pr_figure(curves, f"Precision-recall curve ({data_name(split)})"))
    result["reliability"] = plots.figure_png(plots.reliability_figure(
        (f"before scaling (ECE {evaluation.calibration['ece_before']:.3f})", *reliability_bins(y_true, raw)),
        (f"after, T = {evaluation.calibration['temperature']:.2f} (ECE {evaluation.calibration['ece_after']:.3f})",
         *reliability_bins(y_true, probabilities)), f"Reliability diagram ({data_name(split)})"))
    result["confusion_matrix"] = plots.figure_png(plots.confusion_matrix_figure(
        evaluation.metrics["confusion_matrix"], class_names, f"Confusion matrix ({data_name(split)})"))
    if evaluation.subgroups:
        result["subgroups"] = plots.figure_png(plots.forest_figure(evaluation.subgroups, overall(evaluation.metrics)))
    result["gradcam_gallery"] = plots.figure_png(gallery(model, dataset, split, evaluation))
    return result


def overall(metrics):
    """The whole set's AUC, sensitivity and specificity (a multi-label model's means over findings), the line a
    subgroup is compared with."""
    if "per_finding" in metrics:
        return {"auc_roc": metrics["mean_auc"], "sensitivity": metrics["mean sensitivity"],
                "specificity": metrics["mean specificity"]}
    return {k: metrics.get(k) for k in ("auc_roc", "sensitivity", "specificity")}


def gallery(model, dataset, split, evaluation):
    """Grad-CAM for the most confident true positives, false positives and false negatives of the positive class
    (of any finding, for a multi-label model: over every known (image, finding) pair).

    Each map explains the call made: the predicted class, or the finding.
    """
    rows, y_true = dataset.split(split)
    image, finding, is_positive, said_positive, p, explained = scoring(model.task).pairs(
        y_true, evaluation.predictions, evaluation.probabilities, model.positive_index)
    title = ("Grad-CAM per finding (most confident first)" if model.positive_index is None else
             f"Grad-CAM, positive class {model.class_names[model.positive_index]} (most confident first)")
    names = dataset.names(rows)
    groups = [("true positives", np.flatnonzero(is_positive & said_positive), -p),
              ("false positives", np.flatnonzero(~is_positive & said_positive), -p),
              ("false negatives", np.flatnonzero(is_positive & ~said_positive), p)]
    picked = [(title, idx[np.argsort(order[idx], kind="stable")][:GALLERY_SIZE]) for title, idx, order in groups]
    chosen = np.concatenate([idx for _, idx in picked]).astype(int)
    pictures = np.asarray(dataset.images[rows[image[chosen]]])
    maps = gradcam.heatmaps(model.keras_model, pictures, explained[chosen]) if len(chosen) else []
    grid, k = [], 0
    for group, idx in picked:
        items = []
        for i in idx:
            caption = f"{names[image[i]]}\np({model.class_names[finding[i]]}) = {p[i]:.3f}"
            items.append((gradcam.overlay(pictures[k], maps[k]), caption))
            k += 1
        grid.append((group, items))
    return plots.gallery_figure(grid, title)


def _finite_or_none(value):
    return float(value) if value is not None and np.isfinite(value) else None
