"""Probabilities -> calibration, an operating point and test metrics with bootstrap confidence intervals.

Everything is plain numpy in and out: `probabilities` are (N, classes) softmax outputs, `y_true` class indices;
for a multi-label model (N, findings) sigmoid outputs and an (N, findings) labels matrix, 1 / 0 / NaN
(unknown: left out of every fit and metric of that finding). Calibration and the operating point are fitted
on validation and only applied to test.
"""

import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, brier_score_loss,
                             classification_report, confusion_matrix, roc_auc_score, roc_curve)

from cxr.errors import warn
from cxr.progress import progress
from cxr.model.inference import TINY, apply_finding_temperatures, apply_temperature, decide

ECE_BINS = 15


# --- calibration -------------------------------------------------------------------------------------------

def _best_temperature(nll):
    """The temperature in [0.05, 20] minimising `nll(log temperature)`."""
    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def fit_temperature(y_true, probabilities):
    """The temperature minimising the negative log-likelihood of `y_true` (Guo et al., 2017)."""
    def nll(log_t):
        p = apply_temperature(probabilities, np.exp(log_t))
        return -np.mean(np.log(np.clip(p[np.arange(len(y_true)), y_true], TINY, 1.0)))

    return _best_temperature(nll)


def fit_finding_temperature(is_positive, probabilities):
    """The temperature T minimising the negative log-likelihood of sigmoid(logit(p) / T) for one finding."""
    def nll(log_t):
        p = np.clip(apply_finding_temperatures(probabilities, np.exp(log_t)), TINY, 1 - TINY)
        return -np.mean(np.where(is_positive, np.log(p), np.log1p(-p)))

    return _best_temperature(nll)


def probability_bins(hits, probabilities, bins=ECE_BINS):
    """(mean probability, share of hits, count) per non-empty equal-width bin of `probabilities` (n,), for
    `hits` (n,) bool: whether each call was right (top-label reliability) or each finding present."""
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    used = [b for b in range(bins) if np.any(which == b)]
    return (np.array([probabilities[which == b].mean() for b in used]),
            np.array([hits[which == b].mean() for b in used]), np.array([np.sum(which == b) for b in used]))


def _calibration_error(confidence, observed, counts):
    return float(np.sum(np.abs(observed - confidence) * counts) / np.sum(counts))


def finding_calibration_error(labels, probabilities, bins=ECE_BINS):
    """ECE over every known (image, finding) pair of a multi-label model: |share positive - mean p| per bin."""
    known = ~np.isnan(labels)
    if not known.any():
        return float("nan")
    return _calibration_error(*probability_bins(labels[known] == 1, probabilities[known], bins))


def reliability_bins(y_true, probabilities, bins=ECE_BINS):
    """(mean confidence, accuracy, count) per non-empty equal-width bin of top-label confidence."""
    return probability_bins(probabilities.argmax(axis=1) == y_true, probabilities.max(axis=1), bins)


def expected_calibration_error(y_true, probabilities, bins=ECE_BINS):
    """Top-label ECE: |accuracy - confidence| per confidence bin, weighted by the bin's share of images."""
    return _calibration_error(*reliability_bins(y_true, probabilities, bins))


# --- operating point ---------------------------------------------------------------------------------------

def choose_threshold(is_positive, scores, target_sensitivity=None):
    """The decision threshold on `scores` (positive when score >= threshold), chosen on validation.

    Default: the threshold maximising Youden's J (sensitivity + specificity - 1). With `target_sensitivity`: the
    highest threshold whose sensitivity reaches the target. Returns (threshold, sensitivity, specificity).
    """
    fpr, tpr, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if target_sensitivity is None:
        best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    else:
        best = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])  # thresholds decrease, tpr rises
    return float(thresholds[best]), float(tpr[best]), float(1 - fpr[best])


def fit_operating_point(y_val, probabilities_val, class_names, positive_class, target_sensitivity=None):
    """Temperature and (binary) threshold fitted on validation, as stored beside the model."""
    positive_index = class_names.index(positive_class)
    temperature = fit_temperature(y_val, probabilities_val)
    point = {"positive_class": positive_class, "temperature": temperature, "threshold": None,
             "method": "argmax", "target_sensitivity": target_sensitivity}
    if len(class_names) != 2:
        return point
    is_positive = y_val == positive_index
    if is_positive.all() or not is_positive.any():
        warn("the validation set holds a single class, so no threshold can be chosen; using 0.5")
        return point | {"threshold": 0.5, "method": "default 0.5"}
    calibrated = apply_temperature(probabilities_val, temperature)[:, positive_index]
    threshold, sensitivity, specificity = choose_threshold(is_positive, calibrated, target_sensitivity)
    method = "youden" if target_sensitivity is None else f"sensitivity >= {target_sensitivity:g}"
    return point | {"threshold": threshold, "method": method, "val_sensitivity": sensitivity,
                    "val_specificity": specificity}


def fit_finding_points(labels, probabilities, findings, target_sensitivity=None, keep=None):
    """A multi-label model's operating point: per finding, a temperature and a threshold (the same rules as
    `fit_operating_point`) fitted on its known labels in `labels` (n, findings) for sigmoid outputs
    `probabilities` (n, findings).

    A finding without both positives and negatives among them gets no threshold from them: it keeps its point
    in `keep` (a model's previous operating point, when recalibrating), else 0.5 uncalibrated; a warning says so.
    A finding with fewer than FEW positives can't hold a sensitivity target or a Youden point (on 2 positives,
    a 0.9 sensitivity target calls whatever scores above the lower one: specificity 0.02 on NIH's
    Consolidation), so its threshold matches the prevalence instead: it calls as many validation images as are
    positive (the n_pos-th highest calibrated probability), and a warning names those findings.
    """
    method = "youden" if target_sensitivity is None else f"sensitivity >= {target_sensitivity:g}"
    points, unfitted, few = {}, [], []
    for k, name in enumerate(findings):
        known = ~np.isnan(labels[:, k])
        is_positive, scores = labels[known, k] == 1, probabilities[known, k]
        counts = {"val_positives": int(is_positive.sum()), "val_negatives": int((~is_positive).sum())}
        if is_positive.all() or not is_positive.any():
            unfitted.append(f"{name} ({counts['val_positives']} positive, {counts['val_negatives']} negative)")
            previous = (keep or {}).get("findings", {}).get(name)
            points[name] = (dict(previous) if previous else
                            {"temperature": 1.0, "threshold": 0.5, "method": "default 0.5"}) | counts
            continue
        temperature = fit_finding_temperature(is_positive, scores)
        calibrated = apply_finding_temperatures(scores, temperature)
        if counts["val_positives"] < FEW:
            few.append(f"{name} ({counts['val_positives']})")
            threshold = float(np.sort(calibrated)[::-1][counts["val_positives"] - 1])
            called = calibrated >= threshold
            sensitivity, specificity = float(called[is_positive].mean()), float(1 - called[~is_positive].mean())
            rule = f"prevalence: {counts['val_positives']} validation positives, too few for {method}"
        else:
            threshold, sensitivity, specificity = choose_threshold(is_positive, calibrated, target_sensitivity)
            rule = method
        points[name] = {"temperature": temperature, "threshold": threshold, "method": rule,
                        "val_sensitivity": sensitivity, "val_specificity": specificity} | counts
    if unfitted:
        kept = "keep the model's previous operating point" if keep else "use 0.5, uncalibrated"
        warn(f"no threshold can be fitted for findings without both positive and negative images: "
             f"{', '.join(unfitted)}; they {kept}")
    if few:
        warn(f"fewer than {FEW} validation positives for {', '.join(few)}: too few to fit a threshold by {method}, "
             "so each calls as many validation images as are positive (its prevalence); their calls are rough")
    return {"findings": points, "method": method, "target_sensitivity": target_sensitivity}


# --- metrics -----------------------------------------------------------------------------------------------

def rank_auc(is_positive, scores):
    """ROC AUC by the Mann-Whitney statistic (ties count half, as scikit-learn's): NaN without both classes.
    Thousands of bootstrap draws per subgroup need it faster than roc_auc_score."""
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[is_positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def rates(is_positive, called):
    """(sensitivity, specificity) of (n,) bool calls, NaN where a class is absent."""
    positives, negatives = is_positive.sum(), (~is_positive).sum()
    return (float((called & is_positive).sum() / positives) if positives else float("nan"),
            float((~called & ~is_positive).sum() / negatives) if negatives else float("nan"))


def _ratio(num, den):
    return float(num / den) if den else float("nan")


def one_vs_rest(is_positive, predicted_positive, scores):
    """Sensitivity, specificity, PPV, NPV, F1, AUC-ROC, AUC-PR and Brier for one class against the rest."""
    tp = np.sum(predicted_positive & is_positive)
    fp = np.sum(predicted_positive & ~is_positive)
    fn = np.sum(~predicted_positive & is_positive)
    tn = np.sum(~predicted_positive & ~is_positive)
    both = 0 < is_positive.sum() < len(is_positive)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc_roc": float(roc_auc_score(is_positive, scores)) if both else float("nan"),
        "auc_pr": float(average_precision_score(is_positive, scores)) if is_positive.any() else float("nan"),
        "brier": float(brier_score_loss(is_positive, scores)),
    }


def headline_metrics(y_true, probabilities, class_names, positive_index, threshold=None):
    """Every headline number as a flat {name: value} dict (NaN where undefined).

    Binary: the positive class's one-vs-rest numbers at the threshold, plus accuracy, balanced accuracy and ECE.
    Multi-class: each class's one-vs-rest numbers at argmax as "CLASS sensitivity" etc., and their macro means.
    """
    y_pred = decide(probabilities, positive_index, threshold)
    overall = {"accuracy": float(accuracy_score(y_true, y_pred)),
               "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(np.unique(y_true)) > 1
               else float(np.mean(y_pred == y_true)),
               "ece": expected_calibration_error(y_true, probabilities)}
    if len(class_names) == 2:
        return one_vs_rest(y_true == positive_index, y_pred == positive_index, probabilities[:, positive_index]) | overall
    per_class = {c: one_vs_rest(y_true == c, y_pred == c, probabilities[:, c]) for c in range(len(class_names))}
    flat = {f"{class_names[c]} {k}": v for c, values in per_class.items() for k, v in values.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from a resample: its mean is NaN
        macro = {f"macro {k}": float(np.nanmean([per_class[c][k] for c in per_class])) for k in per_class[0]}
    return macro | overall | flat


FINDING_METRICS = ("auc_roc", "auc_pr", "sensitivity", "specificity", "ppv", "npv", "f1", "brier")


def finding_metrics(labels, probabilities, called, findings):
    """A multi-label model's numbers as a flat {name: value} dict (NaN where undefined): "<finding> auc_roc",
    "<finding> sensitivity", ... (FINDING_METRICS, each finding on its known labels, at its threshold:
    `called` (n, findings) 0/1), their means over findings ("mean_auc", "mean_auc_pr", "mean sensitivity",
    ...) and the ECE over every known (image, finding) pair."""
    flat, nan = {}, float("nan")
    for k, name in enumerate(findings):
        known = ~np.isnan(labels[:, k])
        is_positive = labels[known, k] == 1
        values = (one_vs_rest(is_positive, called[known, k] == 1, probabilities[known, k]) if known.any()
                  else dict.fromkeys(FINDING_METRICS, nan))
        flat |= {f"{name} {m}": values[m] for m in FINDING_METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a finding with one class in a resample: NaN, skipped
        means = {m: float(np.nanmean([flat[f"{name} {m}"] for name in findings])) for m in FINDING_METRICS}
    return ({"mean_auc": means["auc_roc"], "mean_auc_pr": means["auc_pr"]}
            | {f"mean {m}": means[m] for m in FINDING_METRICS[2:]}
            | {"ece": finding_calibration_error(labels, probabilities)} | flat)


def finding_counts(labels, findings):
    """{finding: {"n_known", "n_positive", "prevalence", "status"}}: status says when a finding's metrics are
    undefined in these labels ("no labels", "no positives", "no negatives"), else "ok"."""
    result = {}
    for k, name in enumerate(findings):
        known = ~np.isnan(labels[:, k])
        positives = int(np.sum(labels[known, k] == 1))
        negatives = int(known.sum()) - positives
        status = ("no labels" if not known.any() else "no positives" if not positives
                  else "no negatives" if not negatives else "ok")
        result[name] = {"n_known": int(known.sum()), "n_positive": positives,
                        "prevalence": positives / int(known.sum()) if known.any() else None, "status": status}
    return result


def patient_resamples(patients, n_resamples, seed):
    """Row indices of `n_resamples` bootstrap samples that draw patients with replacement (every image of a
    drawn patient comes along): images of one patient are not independent (seeded)."""
    rng = np.random.default_rng(seed)
    _, member = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    order = np.argsort(member, kind="stable")
    starts = np.searchsorted(member[order], np.arange(member.max() + 2))
    groups = [order[starts[g]:starts[g + 1]] for g in range(len(starts) - 1)]
    for _ in range(n_resamples):
        yield np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])


def stratified_resamples(y_true, n_resamples, seed):
    """Row indices of `n_resamples` bootstrap samples that keep each class's count (seeded)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    for _ in range(n_resamples):
        yield np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])


def confidence_intervals(statistics, y_true, n_resamples=2000, seed=0, level=0.95, patients=None):
    """{name: [low, high]}: percentile intervals of `statistics(rows) -> {name: value}` over bootstrap
    resamples of the rows of `y_true` (e.g. `headline_metrics` of those rows): stratified by class, or with
    `patients` ((n,) keys) by patient (`patient_resamples`)."""
    if n_resamples <= 0:
        return {}
    resamples = (patient_resamples(patients, n_resamples, seed) if patients is not None
                 else stratified_resamples(y_true, n_resamples, seed))
    samples = [statistics(rows) for rows in progress(resamples, total=n_resamples, desc="Bootstrap", unit="resample")]
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name in samples[0]:
        values = np.array([s[name] for s in samples])
        values = values[np.isfinite(values)]
        intervals[name] = ([float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
                           if len(values) else [None, None])
    return intervals


PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")
FEW = 20  # positives or negatives below which a number's interval is wide whatever the method: said so


def proportion_intervals(is_positive, called, prefix="", level=0.95):
    """{prefix + "sensitivity" | "specificity" | "ppv" | "npv": [low, high]}: exact (Clopper-Pearson) intervals of
    the proportions behind each number. A bootstrap of a proportion at its bound has zero width (9 of 9 positives
    found: 1.000 to 1.000); the exact interval of 9 of 9 is 0.66 to 1.00."""
    is_positive, called = np.asarray(is_positive, bool), np.asarray(called, bool)
    counts = {"sensitivity": (called & is_positive, is_positive), "specificity": (~called & ~is_positive, ~is_positive),
              "ppv": (called & is_positive, called), "npv": (~called & ~is_positive, ~called)}
    intervals = {}
    for name, (hits, among) in counts.items():
        n = int(among.sum())
        intervals[prefix + name] = list(exact_interval(int(hits.sum()), n, level)) if n else [None, None]
    return intervals


def exact_interval(hits, n, level=0.95):
    """(low, high): the exact (Clopper-Pearson) interval of the proportion hits / n, n >= 1."""
    from scipy.stats import binomtest

    low, high = binomtest(int(hits), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(low), float(high)


def few_cases(is_positive, name=""):
    """A caution for a number that rests on fewer than FEW positives or negatives, or None."""
    positives, negatives = int(np.sum(is_positive)), int(np.sum(~np.asarray(is_positive, bool)))
    if min(positives, negatives) >= FEW:
        return None
    return (f"{name + ': ' if name else ''}{positives} positive and {negatives} negative images: fewer than {FEW} "
            "of one kind, so these numbers are rough (see their intervals)")


def roc_band(is_positive, scores, n_resamples=2000, seed=0, level=0.95, grid=101):
    """(fpr grid, lower tpr, upper tpr): a pointwise bootstrap band around the ROC curve."""
    fpr_grid = np.linspace(0, 1, grid)
    curves = []
    for rows in stratified_resamples(is_positive.astype(int), n_resamples, seed):
        fpr, tpr, _ = roc_curve(is_positive[rows], scores[rows])
        curves.append(np.interp(fpr_grid, fpr, tpr))
    tail = (1 - level) / 2 * 100
    return fpr_grid, np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)


def classification(y_true, y_pred, class_names):
    """scikit-learn's classification report as a dict, for the predictions at the operating point."""
    return classification_report(y_true, y_pred, labels=list(range(len(class_names))), target_names=class_names,
                                 output_dict=True, zero_division=0)


def auc_score(y_true, probabilities, num_classes):
    """ROC AUC: binary for two classes, macro one-vs-rest for more; None when the labels hold one class."""
    present = np.unique(y_true)
    if len(present) < 2:
        warn("the test set holds a single class, so AUC is undefined and reported as null")
        return None
    if num_classes == 2:
        return float(roc_auc_score(y_true, probabilities[:, 1]))
    if len(present) < num_classes:
        warn("some classes are missing from the test set; AUC is the macro one-vs-rest over the present ones")
        return float(np.mean([roc_auc_score(y_true == c, probabilities[:, c]) for c in present]))
    return float(roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro"))


def confusion(y_true, y_pred, num_classes):
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
