"""Metrics per subgroup (sex, age band, view, device, any column named with --subgroup) and the gaps between
them, with bootstrap confidence intervals.

Chest X-ray models are known to differ by subgroup (Seyyed-Kalantari et al., Nature Medicine 2021:
underdiagnosis of young and female patients); an evaluation that reports one number for the whole test set
hides it. Each attribute's groups come from the dataset's metadata (a labels CSV's columns, DICOM tags), are
aggregated (age into bands, sex into female / male), and only the groups' numbers leave this module: no
per-image metadata reaches a report.

The gap of an attribute is the largest difference in sensitivity (the underdiagnosis measure: a lower
sensitivity is a higher false negative rate) and in specificity between two of its groups with at least
MIN_GROUP images, with a patient-level bootstrap interval for that difference; it is flagged when the interval
excludes zero.
"""

import re
import warnings
from dataclasses import dataclass

import numpy as np

from cxr.evaluate.metrics import patient_resamples
from cxr.evaluate.scoring import scoring

AGE_BANDS = (18, 40, 60, 80)  # band edges: 0-17, 18-39, 40-59, 60-79, 80+
MIN_GROUP = 20  # below this many images a group's numbers are shown but marked as unstable
ATTRIBUTES = ("sex", "age", "view", "manufacturer", "device_model")


def age_band(value, edges=AGE_BANDS):
    """'0-17', '18-39', ... '80+' for an age ('61', DICOM's '061Y', '018M'), or None when unreadable."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*", str(value).upper())
    if not match:
        return None
    years = float(match.group(1)) / {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}[match.group(2)]
    lower = 0
    for edge in edges:
        if years < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f"{lower}+"


def sex_group(value):
    text = str(value or "").strip().upper()
    return {"F": "female", "FEMALE": "female", "M": "male", "MALE": "male"}.get(text, "other" if text else None)


def view_group(value):
    text = str(value or "").strip().upper()
    return text if text in ("PA", "AP") else "other" if text else None


def groups_of(metadata, rows, extra=(), edges=AGE_BANDS):
    """{attribute: (n,) group names (None: unknown)} for `rows`, for every attribute that some row has."""
    readers = {"sex": sex_group, "age": lambda v: age_band(v, edges), "view": view_group}
    result = {}
    for attribute in (*ATTRIBUTES, *extra):
        values = metadata.get(attribute)
        if values is None:
            continue
        read = readers.get(attribute, lambda v: None if v in (None, "") else str(v))
        groups = np.array([read(values[r]) for r in rows], dtype=object)
        if any(g is not None for g in groups):
            result[attribute] = groups
    return result


@dataclass(frozen=True)
class Scored:
    """A model's answers on n labelled images, as `evaluate_model` has them: `y` (class indices, or a labels
    matrix for a model of findings), `probabilities` (n, classes), `calls` (n,) or (n, findings), the model's
    `task` (`cxr.model.task.Task`) and the positive class's index (binary models)."""
    y: np.ndarray
    probabilities: np.ndarray
    calls: np.ndarray
    task: object
    positive_index: int = None

    def numbers(self, rows):
        """The subgroup numbers of the images `rows` (`scoring(task).group_numbers`)."""
        return scoring(self.task).group_numbers(self.y[rows], self.probabilities[rows], self.calls[rows],
                                                self.positive_index)


def subgroup_analysis(groups, scored, patients, n_resamples=1000, seed=0, level=0.95):
    """{attribute: {"groups": {group: {metric: value, "ci": {metric: [low, high]}, "small": bool}},
    "gaps": {"sensitivity" | "specificity": {"groups": [low group, high group], "difference": d, "ci": [l, h],
    "flagged": bool} or None}}} for `groups` ({attribute: (n,) names, None unknown}) and the answers `scored`
    (a `Scored`); resamples are of patients (`patients`, (n,) keys) over the whole set, so that a group's interval
    and a gap's come from the same draws.
    """
    y = scored.y

    def stats(rows, members):
        return scored.numbers(rows[members])

    every = np.arange(len(y))
    draws = list(patient_resamples(patients, n_resamples, seed)) if n_resamples else []
    tail = (1 - level) / 2 * 100
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group without positives in a draw: NaN, skipped
        for attribute, names in groups.items():
            present = sorted({g for g in names if g is not None})
            table, samples = {}, {}
            for group in present:
                numbers = stats(every, names == group)
                samples[group] = [stats(rows, names[rows] == group) for rows in draws]
                table[group] = _json(numbers) | {"small": numbers["n_images"] < MIN_GROUP, "ci": {
                    k: _percentiles([s[k] for s in samples[group]], tail) for k in numbers if k != "n_images"}}
            result[attribute] = {"groups": table, "gaps": {
                m: _gap(table, samples, m, tail) for m in ("sensitivity", "specificity")}}
    return result


def _gap(table, samples, metric, tail):
    """The largest difference in `metric` between two groups of MIN_GROUP images or more, with its interval."""
    usable = [g for g, v in table.items() if not v["small"] and v[metric] is not None]
    if len(usable) < 2:
        return None
    low = min(usable, key=lambda g: table[g][metric])
    high = max(usable, key=lambda g: table[g][metric])
    differences = [h[metric] - lo[metric] for h, lo in zip(samples[high], samples[low])]
    interval = _percentiles(differences, tail)
    flagged = interval[0] is not None and (interval[0] > 0 or interval[1] < 0)
    return {"groups": [low, high], "difference": table[high][metric] - table[low][metric], "ci": interval,
            "flagged": bool(flagged)}


def _percentiles(values, tail):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) else [None, None]


def _json(numbers):
    return {k: (v if isinstance(v, int) else float(v) if np.isfinite(v) else None) for k, v in numbers.items()}


NO_METADATA = ("No subgroup analysis was possible: the evaluated images carry no sex, age, view or device (class "
               "folders of JPEG or PNG files have none; a labels CSV with those columns, or DICOM files with "
               "PatientSex, PatientAge, ViewPosition and Manufacturer, give them).")
