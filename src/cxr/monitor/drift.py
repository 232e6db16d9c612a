"""What `cxr monitor` measures in each window of logged answers, against the model's reference (its validation
split), and when it alerts.

Each signal is judged only on enough answers, and each alert is a difference that chance in the window (and in
the validation sample behind the reference) can't explain, so a small window says "too few" instead of crying
wolf:

- flagged: the share of answers the population check flags, against the rate it flags images like the
  validation ones. Alert when the interval's lower end is above `flagged` or `flagged_factor` times that rate.
- call rate, per class or finding: the share called, against validation's. Alert when it moved by more than
  `call_rate_gap` and Fisher's exact test of the two samples gives p < `call_rate_p`.
- score drift, per class or finding: the population stability index of the calibrated probabilities over
  validation's deciles, and a two-sample Kolmogorov-Smirnov test. Alert when PSI > `psi` (the usual "major
  shift") on at least `psi_min_answers` answers.
- input mix, per property (format, resolution band, and from DICOM headers modality, view, manufacturer, model,
  sex, age band): the share of each category against validation's. Alert when the total variation distance is
  above `input_mix` and a chi-square test of the two samples gives p < `input_mix_p`.
- realized performance, where confirmed labels are given: AUC, sensitivity and specificity with exact intervals.
  Alert when the sensitivity (or specificity) is below validation's, on at least `min_labelled` positives
  (negatives), with Fisher's exact test p < `realized_p`.

The defaults (`Thresholds`) were chosen on measured false-alarm rates and detection delays: see
benchmarks/bench_monitor.py and its section of benchmarks/README.md. `cxr monitor --threshold NAME=VALUE`
overrides each.
"""

from dataclasses import dataclass, fields

import numpy as np

BINS = 10


@dataclass(frozen=True)
class Thresholds:
    """When `cxr monitor` alerts (see the module docstring)."""
    min_window: int = 30  # answers below which no signal of a window is judged
    flagged: float = 0.03
    flagged_factor: float = 3
    call_rate_gap: float = 0.10
    call_rate_p: float = 0.001  # strict: every class or finding of every window is a test
    psi: float = 0.25
    psi_min_answers: int = 200  # on 100 answers PSI alone raised 3 % false alarms (bench_monitor.py)
    min_labelled: int = 10
    realized_p: float = 0.01
    input_mix: float = 0.2
    input_mix_p: float = 0.001

    @classmethod
    def parse(cls, settings):
        """The defaults with `settings` ("NAME=VALUE" texts) over them; ValueError naming a bad one."""
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for setting in settings:
            name, _, value = setting.partition("=")
            if name not in types:
                raise ValueError(f"{setting!r}: no threshold {name!r}; the thresholds are {', '.join(types)}")
            try:
                values[name] = (int if types[name] in (int, "int") else float)(value)
            except ValueError:
                raise ValueError(f"{setting!r}: {name} takes a number") from None
        return cls(**values)


def psi(reference, current, bins=BINS):
    """Population stability index of `current` against `reference` over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    if len(edges) < 3:
        return 0.0
    expected = np.histogram(reference, edges)[0] / len(reference)
    observed = np.histogram(current, edges)[0] / len(current)
    expected, observed = np.clip(expected, 1e-4, None), np.clip(observed, 1e-4, None)
    return float(np.sum((observed - expected) * np.log(observed / expected)))


def outputs_of(reference, positive_class=None):
    """The classes or findings judged one by one: a binary model's positive class, else every one."""
    if not reference.multi_label and len(reference.class_names) == 2:
        return [positive_class or reference.class_names[1]]
    return list(reference.class_names)


def judge(rows, reference, positive_class=None, labels=None, thresholds=Thresholds()):
    """One window's numbers and alerts: `rows` are logged answers (dicts of the predictions table) in time
    order; `labels`: {image_key: class name, or {finding: 0/1}} confirmed later, or None."""
    from scipy.stats import ks_2samp

    from cxr.evaluate.metrics import exact_interval

    n = len(rows)
    window = {"start": _time(rows[0]["time"]), "end": _time(rows[-1]["time"]), "n": n, "alerts": []}
    t = thresholds
    if n < t.min_window:
        window["judged"] = f"too few answers to judge ({n}; at least {t.min_window})"
        return window
    alerts = window["alerts"]
    checked = [r["in_distribution"] for r in rows if r["in_distribution"] is not None]
    if checked:
        flagged = sum(not v for v in checked)
        low, high = exact_interval(flagged, len(checked))
        limit = max(t.flagged, t.flagged_factor * reference.flag_rate)
        window["flagged"] = {"share": flagged / len(checked), "interval": [low, high], "reference": reference.flag_rate}
        if low > limit:
            alerts.append(_alert("flagged", flagged / len(checked), limit,
                                 f"{flagged} of {len(checked)} answers ({flagged / len(checked):.0%}) were flagged as "
                                 f"unlike the training images (validation: {reference.flag_rate:.1%}): another "
                                 "population, device or protocol is reaching the model"))
    window["outputs"] = {}
    for name in outputs_of(reference, positive_class):
        k = reference.class_names.index(name)
        called = sum(name in r["calls"] for r in rows)
        low, high = exact_interval(called, n)
        expected = float(reference.calls[:, k].mean())
        scores = np.array([r["probabilities"][name] for r in rows], dtype=np.float64)
        drift = psi(reference.probabilities[:, k], scores)
        numbers = {"call_rate": called / n, "call_rate_interval": [low, high], "reference_call_rate": expected,
                   "psi": round(drift, 4), "ks_p": float(ks_2samp(reference.probabilities[:, k], scores).pvalue)}
        window["outputs"][name] = numbers
        if abs(called / n - expected) > t.call_rate_gap and different(called, n, reference.calls[:, k].sum(),
                                                                      len(reference.calls), t.call_rate_p):
            alerts.append(_alert(f"call_rate {name}", called / n, expected,
                                 f"{name} is called for {called / n:.0%} of answers against {expected:.0%} on "
                                 "validation"))
        if n >= t.psi_min_answers and drift > t.psi:
            alerts.append(_alert(f"psi {name}", drift, t.psi,
                                 f"the probabilities of {name} have shifted (PSI {drift:.2f} against validation)"))
    if reference.inputs:
        window["inputs"] = input_shift(rows, reference, t, alerts)
    if n < t.psi_min_answers:
        window["judged"] = f"score drift not judged on fewer than {t.psi_min_answers} answers"
    if labels:
        window["realized"] = realized(rows, reference, labels, positive_class, alerts, t)
    return window


def input_shift(rows, reference, t, alerts):
    """{property: the window's and validation's shares per category, their total variation distance and the
    chi-square p-value}; alerts appended to `alerts`."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    from cxr.monitor.log import input_mix

    mixes = [input_mix(r) for r in rows]
    result = {}
    for name, expected in reference.inputs.items():
        counts = Counter(m[name] for m in mixes)
        categories = sorted(set(expected) | set(counts))
        n, n_ref = len(mixes), sum(expected.values())
        distance = 0.5 * sum(abs(counts[c] / n - expected.get(c, 0) / n_ref) for c in categories)
        p = (chi2_contingency([[counts[c] for c in categories], [expected.get(c, 0) for c in categories]]).pvalue
             if len(categories) > 1 else 1.0)
        result[name] = {"shares": {c: counts[c] / n for c in categories if counts[c]},
                        "reference": {c: v / n_ref for c, v in expected.items()},
                        "distance": round(distance, 4), "p": float(p)}
        if distance > t.input_mix and p < t.input_mix_p:
            top = max(categories, key=lambda c: counts[c] / n - expected.get(c, 0) / n_ref)
            alerts.append(_alert(f"inputs {name}", distance, t.input_mix,
                                 f"the images' {name.replace('_', ' ')} changed: {counts[top] / n:.0%} are {top} "
                                 f"against {expected.get(top, 0) / n_ref:.0%} on validation"))
    return result


def realized(rows, reference, labels, positive_class, alerts, thresholds=Thresholds()):
    """{class or finding: AUC, sensitivity and specificity with exact intervals} on the window's answers that have
    a confirmed label, each beside validation's; alerts appended to `alerts`."""
    from sklearn.metrics import roc_auc_score

    from cxr.evaluate.metrics import exact_interval

    known = [(r, labels[r["image_key"]]) for r in rows if r["image_key"] in labels]
    result = {"n": len(known)}
    for name in outputs_of(reference, positive_class):
        k = reference.class_names.index(name)
        truth = [(r, _is(label, name, reference.multi_label)) for r, label in known]
        truth = [(r, t) for r, t in truth if t is not None]
        positive = np.array([t for _, t in truth], dtype=bool)
        called = np.array([name in r["calls"] for r, _ in truth], dtype=bool)
        scores = np.array([r["probabilities"][name] for r, _ in truth])
        ref_truth = reference.task.labels_matrix(reference.labels)[:, k]
        ref_known = ~np.isnan(ref_truth)
        ref_positive, ref_called = ref_truth[ref_known] == 1, reference.calls[ref_known, k] == 1
        numbers = {"positives": int(positive.sum()), "negatives": int((~positive).sum())}
        for metric, among, ref_among, want in (("sensitivity", positive, ref_positive, True),
                                               ("specificity", ~positive, ~ref_positive, False)):
            hits = int(np.sum(called[among] == want))
            value = hits / among.sum() if among.sum() else None
            interval = list(exact_interval(hits, int(among.sum()))) if among.sum() else [None, None]
            expected = float(np.mean(ref_called[ref_among] == want)) if ref_among.any() else None
            numbers[metric] = {"value": value, "interval": interval, "reference": expected}
            if (among.sum() >= thresholds.min_labelled and expected is not None and value < expected
                    and different(hits, int(among.sum()), int(np.sum(ref_called[ref_among] == want)),
                                  int(ref_among.sum()), thresholds.realized_p)):
                alerts.append(_alert(f"{metric} {name}", value, expected,
                                     f"realized {metric} of {name} is {value:.2f} ({interval[0]:.2f} to "
                                     f"{interval[1]:.2f}) on {int(among.sum())} confirmed cases, below validation's "
                                     f"{expected:.2f}"))
        numbers["auc_roc"] = (float(roc_auc_score(positive, scores)) if 0 < positive.sum() < len(positive) else None)
        result[name] = numbers
    return result


def different(hits, n, reference_hits, reference_n, p_value):
    """Whether hits / n differs from the reference's share by more than chance in either sample explains:
    Fisher's exact test (the reference is a sample too: 36 validation images are not a known rate)."""
    from scipy.stats import fisher_exact

    table = [[hits, n - hits], [reference_hits, reference_n - reference_hits]]
    return fisher_exact(table).pvalue < p_value


def _is(label, name, multi_label):
    """Whether a confirmed label says `name` (None where it says nothing of it)."""
    if multi_label:
        value = label.get(name) if isinstance(label, dict) else None
        return None if value is None else bool(value)
    return label == name


def _alert(signal, value, threshold, message):
    return {"signal": signal, "value": None if value is None else round(float(value), 4),
            "threshold": round(float(threshold), 4), "message": message}


def _time(value):
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
