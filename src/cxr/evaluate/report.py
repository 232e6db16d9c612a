"""The evaluation as tables: metrics.csv rows, the classification report rows and one self-contained HTML page."""

import base64
import datetime
import html
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cxr.model.inference import describe_fitted_on

LIMITS_OF_USE = [
    "This is a research tool, not a medical device. Its output is not a substitute for the judgement of a "
    "qualified clinician and must not be used on its own to diagnose or treat anyone.",
    "These numbers describe the test images listed above only. Validate the model on external data (another "
    "hospital, device or period) with `cxr evaluate` before trusting it anywhere else.",
    "Performance can differ by age (children and adults), sex, X-ray device, view (PA, AP, portable) and "
    "acquisition protocol; check subgroups before use, and watch for shortcut features such as text markers.",
    "The operating point and the calibration were fitted on the data named below; a new population may need "
    "them refitted on a labelled sample of its own (`cxr calibrate`).",
]

FIGURE_CAPTIONS = {
    "roc": "ROC curve with its 95% bootstrap band; the dot is the saved operating point.",
    "pr": "Precision-recall curve.",
    "reliability": "Reliability diagram before and after temperature scaling.",
    "confusion_matrix": "Confusion matrix at the operating point: counts and row-normalised rates.",
    "gradcam_gallery": "Grad-CAM: where the model found evidence, for its most confident true positives, "
                       "false positives and false negatives.",
    "training_curves": "Loss and accuracy per epoch, both training phases.",
    "subgroups": "Subgroups: each group's AUC, sensitivity and specificity with its 95% bootstrap interval; the "
                 "dashed line is the whole set's value.",
}


@dataclass
class ReportContext:
    """What the report says around an evaluation: which run, which images, which settings."""

    title: str
    subtitle: str
    counts: dict  # {split: {class: images}}
    settings: dict  # the run's options, shown as the configuration table and stored in summary.json
    extra_figures: dict = field(default_factory=dict)  # {name: PNG bytes} after the evaluation's own
    note: str = ""  # a warning shown beside the operating point (e.g. it was fitted on other data)
    data: str = "the evaluated images"  # what the metrics are measured on, in the section titles
    defaults: dict = None  # the options' defaults: the configuration table shows only what differs from them
    about: dict = field(default_factory=dict)  # {"model_sha256", "seconds"}: shown with the versions and date


def metric_rows(values, intervals):
    """metrics.csv: one row per headline metric with its 95% bootstrap interval (blank where undefined)."""
    rows = [["metric", "value", "ci_low", "ci_high"]]
    for name, value in values.items():
        low, high = intervals.get(name, [None, None])
        rows.append([name, *(_number(v) for v in (value, low, high))])
    return rows


def classification_rows(classification):
    """A scikit-learn classification report dict as CSV rows (header first)."""
    total = int(classification["macro avg"]["support"])
    rows = [["class", "precision", "recall", "f1-score", "support"]]
    for name, values in classification.items():
        if name == "accuracy":
            rows.append(["accuracy", "", "", f"{values:.4f}", str(total)])
        else:
            rows.append([name, *(f"{values[k]:.4f}" for k in ("precision", "recall", "f1-score")),
                         str(int(values["support"]))])
    return rows


def render_html(context, evaluation, headline, figures):
    """One HTML page with every figure embedded as a data URI, so the file can be mailed or archived alone.

    `headline`: {metric: value} shown with the evaluation's intervals; `figures`: {name: PNG bytes}.
    """
    e = html.escape
    title, subtitle, counts, config = context.title, context.subtitle, context.counts, context.settings
    operating_point = evaluation.operating_point
    intervals = evaluation.confidence_intervals
    cautions = "".join(f'<p class="limits">Caution: {e(c)}</p>' for c in evaluation.cautions[:8])
    layout = (_finding_layout if evaluation.task.multi_label else _class_layout)(evaluation, counts)
    metric_rows_html = "".join(
        f"<tr><th>{e(name)}</th><td>{_number(value, 3) or 'n/a'}</td><td>{_interval(intervals.get(name))}</td></tr>"
        for name, value in headline.items() if layout.shows(name))
    figure_html = "".join(
        f"<figure{' class=wide' if name in layout.wide else ''}><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{e(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, png in figures.items())
    defaults = context.defaults or {}
    shown = {k: v for k, v in config.items() if k not in defaults or v != defaults[k]}
    config_rows = "".join(f"<tr><th>{e(str(k))}</th><td class='wrap'>{e(_setting(v))}</td></tr>"
                          for k, v in shown.items())
    config_note = (f"<p>The options set or differing from their defaults; the other {len(config) - len(shown)} are at "
                   "their defaults (reports/summary.json lists every one).</p>" if defaults else "")
    limits = "".join(f"<li>{e(text)}</li>" for text in LIMITS_OF_USE)
    about = {"cxr": package_version("cxr"), "TensorFlow": package_version("tensorflow-cpu", "tensorflow"),
             "model SHA-256": context.about.get("model_sha256"),
             "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "run time": (f"{context.about['seconds']:.0f} s" if context.about.get("seconds") is not None else None)}
    about_rows = "".join(f"<tr><th>{e(k)}</th><td class='wrap'>{e(str(v))}</td></tr>" for k, v in about.items() if v)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; white-space: nowrap; }}
td.wrap {{ white-space: normal; overflow-wrap: anywhere; max-width: 40em; text-align: left; }}
th {{ background: #f3f3f3; text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }}
figure img {{ max-width: 100%; max-height: 520px; border: 1px solid #ddd; }}
figure.wide {{ display: block; }}
figure.wide img {{ max-height: none; }}
figcaption {{ font-size: 0.9em; color: #555; max-width: 520px; }}
.limits {{ background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5em 1.5em; }}
</style></head><body>
<h1>{e(title)}</h1>
<p>{e(subtitle)}</p>
<section class="limits"><h2>Limits of use</h2><ul>{limits}</ul></section>
<h2>Images</h2>
{layout.count_table}
<h2>Operating point and calibration</h2>
<p>{layout.point}</p>{f'<p class="limits">{e(context.note)}</p>' if context.note else ''}{cautions}
<h2>Metrics on {e(context.data)} (95% {layout.bootstrap} bootstrap confidence
intervals; exact intervals for sensitivity, specificity, PPV and NPV)</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>{metric_rows_html}</table>
{layout.findings}
{shortcut_section(evaluation.shortcuts, evaluation.class_names, operating_point.get('positive_class'))}
{population_section(evaluation.population)}
{subgroup_section(evaluation.subgroups)}
<h2>Figures</h2>
{figure_html}
<h2>Configuration</h2>
{config_note}<table>{config_rows}</table>
<h2>About this report</h2>
<table>{about_rows}</table>
</body></html>
"""


@dataclass(frozen=True)
class Layout:
    """The parts of the report page that differ with the model's task: the image counts, the headline metrics
    shown (`shows(name)`), the operating point in words, the figures shown at full width, the kind of bootstrap and
    the per-finding table ("" for exclusive classes)."""
    count_table: str
    shows: Callable  # (headline metric name) -> whether the headline table shows it
    point: str
    wide: frozenset
    bootstrap: str
    findings: str = ""


def _class_layout(evaluation, counts):
    """A model of exclusive classes: a row of class counts per split; its positive class's threshold."""
    e, point, calibration = html.escape, evaluation.operating_point, evaluation.calibration
    classes = list(next(iter(counts.values())))
    rows = "".join(f"<tr><th>{e(split)}</th>{''.join(f'<td>{n}</td>' for n in per_class.values())}"
                   f"<td>{sum(per_class.values())}</td></tr>" for split, per_class in counts.items())
    threshold = point.get("threshold")
    described = (f"Positive class <b>{e(point['positive_class'])}</b>; "
                 + (f"threshold <b>{threshold:.4f}</b> on the calibrated probability ({e(point['method'])})"
                    if threshold is not None else "multi-class: the most probable class")
                 + f". Temperature and threshold were fitted on {e(describe_fitted_on(point))}"
                 + f". Temperature {calibration['temperature']:.3f}: expected calibration error "
                 f"{calibration['ece_before']:.3f} before, {calibration['ece_after']:.3f} after.")
    return Layout(f"<table><tr><th>split</th>{''.join(f'<th>{e(c)}</th>' for c in classes)}<th>total</th></tr>"
                  f"{rows}</table>", lambda name: True, described, frozenset({"gradcam_gallery", "subgroups"}),
                  "stratified")


def _finding_layout(evaluation, counts):
    """A model of findings: findings down the page and splits across (15 findings across made the page 1,800 px
    wide); the means over findings as headline; each finding's own point, in the table of findings."""
    e, point, calibration = html.escape, evaluation.operating_point, evaluation.calibration
    findings = list(next(iter(counts.values())))
    table = ("<p>Positive images per finding (and images in all) per split.</p>"
             "<table><tr><th>finding</th>" + "".join(f"<th>{e(s)}</th>" for s in counts) + "</tr>" +
             "".join(f"<tr><th>{e(c)}</th>" + "".join(f"<td>{per_class[c]}</td>" for per_class in counts.values())
                     + "</tr>" for c in findings) + "</table>")
    described = (f"One sigmoid output per finding, each with its own temperature and threshold "
                 f"({e(point['method'])}; table below), fitted on {e(describe_fitted_on(point))}. "
                 f"Expected calibration error over every (image, finding) pair {calibration['ece_before']:.3f} before "
                 f"scaling, {calibration['ece_after']:.3f} after.")
    return Layout(table, lambda name: name.startswith("mean") or name == "ece", described,
                  frozenset({"gradcam_gallery", "subgroups", "roc"}), "patient-level", finding_section(evaluation))


def finding_section(evaluation):
    """A multi-label evaluation's per-finding table: counts, threshold and every metric with its interval."""
    e = html.escape
    intervals = evaluation.confidence_intervals
    shown = ("auc_roc", "auc_pr", "sensitivity", "specificity", "ppv", "npv")
    rows = []
    for name, numbers in evaluation.metrics["per_finding"].items():
        cells = "".join(f"<td>{_number(numbers[m], 3) or 'n/a'}<br><small>{_interval(intervals.get(f'{name} {m}'))}"
                        "</small></td>" for m in shown)
        prevalence = _number(numbers["prevalence"], 3) or "n/a"
        status = "" if numbers["status"] == "ok" else f" <small>({e(numbers['status'])})</small>"
        rows.append(f"<tr><th>{e(name)}{status}</th><td>{numbers['n_positive']} / {numbers['n_known']}</td>"
                    f"<td>{prevalence}</td><td>{numbers['threshold']:.3f}</td>{cells}</tr>")
    header = "".join(f"<th>{m}</th>" for m in ("positives / labelled", "prevalence", "threshold", *shown))
    return f"""<h2>Per finding (95% patient-level bootstrap confidence intervals)</h2>
<p>Each finding on the images whose label for it is known, at its own threshold. A finding with one class
only among these images has no AUC (marked).</p>
<table><tr><th>finding</th>{header}</tr>{''.join(rows)}</table>"""


def population_section(population):
    """The report's population check (`evaluate.population_summary`): the share flagged as unlike the training
    images, and the metrics with and without them."""
    e = html.escape
    if not population:
        return ""
    if not population["available"]:
        return f"<h2>Population check</h2><p>{e(population['note'])}</p>"
    names = [k for k in population["metrics_all"] if population["metrics_all"][k] is not None
             or population["metrics_in_distribution"].get(k) is not None]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{_number(population['metrics_all'][k], 3) or 'n/a'}</td>"
                   f"<td>{_number(population['metrics_in_distribution'].get(k), 3) or 'n/a'}</td></tr>" for k in names)
    return f"""<h2>Population check</h2>
<p><b>{population['flagged']} of {population['n_images']} images ({100 * population['flagged_share']:.1f}%)
were flagged as unlike the model's training images</b>: their results are not reliable. The check flags
{100 * population['false_flag_rate']:.1f}% of its own validation images by design; far more than that here means
these images come from another population (other ages, devices or views) or are not chest X-rays.</p>
<table><tr><th>metric</th><th>all images</th><th>images not flagged</th></tr>{rows}</table>"""


def subgroup_section(subgroups):
    """The report's subgroup table and gaps (`evaluate.subgroups`), or why there are none."""
    from cxr.evaluate.subgroups import MIN_GROUP, NO_METADATA

    e = html.escape
    if not subgroups:
        return f"<h2>Subgroups</h2><p>{e(NO_METADATA)}</p>"
    shown = ("auc_roc", "sensitivity", "specificity")
    rows = []
    for attribute, entry in subgroups.items():
        for group, numbers in entry["groups"].items():
            cells = "".join(f"<td>{_number(numbers[m], 3) or 'n/a'}<br><small>{_interval(numbers['ci'].get(m))}"
                            "</small></td>" for m in shown)
            mark = f" <small>(under {MIN_GROUP} images: unstable)</small>" if numbers["small"] else ""
            rows.append(f"<tr><th>{e(attribute)}: {e(group)}{mark}</th><td>{numbers['n_images']}</td>"
                        f"<td>{_number(numbers['prevalence'], 3) or 'n/a'}</td>{cells}</tr>")
    gaps = []
    for attribute, entry in subgroups.items():
        for metric, gap in entry["gaps"].items():
            if gap is None:
                continue
            low, high = gap["groups"]
            verdict = "<b>flagged: the interval excludes zero</b>" if gap["flagged"] else "the interval includes zero"
            gaps.append(f"<li>{e(attribute)}, {metric}: {e(high)} {_number(gap['difference'], 3)} higher than "
                        f"{e(low)} ({_interval(gap['ci'])}); {verdict}</li>")
    return f"""<h2>Subgroups (95% patient-level bootstrap intervals)</h2>
<p>The same metrics within each group of the evaluated images, at the saved operating point (a multi-label
model's: means over findings). Groups under {MIN_GROUP} images are shown and marked; their numbers move a lot
with the sample. A difference between groups can come from the groups' prevalence or case mix as well as
from the model.</p>
<table><tr><th>group</th><th>images</th><th>prevalence</th>{''.join(f'<th>{m}</th>' for m in shown)}</tr>
{''.join(rows)}</table>
<p>Largest gaps between groups of {MIN_GROUP} images or more (a lower sensitivity is more underdiagnosis):</p>
<ul>{''.join(gaps) or '<li>no attribute has two groups that large</li>'}</ul>"""


SHORTCUT_WARNING = 0.05  # share of calls an edit may change before the report flags it


def shortcut_section(check, class_names, positive_class):
    """The report's shortcut check (`evaluate.shortcuts.shortcut_check`'s result) as HTML; empty without one."""
    if not check or not check.get("probes"):
        return ""
    e = html.escape
    binary = check["negatives_called_positive"] is not None

    def share(value):
        return f"{100 * value:.1f}%"

    rows = "".join(
        f"<tr><th>{e(name)}</th><td>{share(numbers['changed_calls'])}</td>"
        + (f"<td>{share(check['negatives_called_positive'])} &rarr; {share(numbers['negatives_called_positive'])}</td>"
           if binary else "") + "</tr>"
        for name, numbers in check["probes"].items())
    flagged = [name.split(" (")[0] for name, numbers in check["probes"].items()
               if numbers["changed_calls"] > SHORTCUT_WARNING]
    limit = f"{100 * SHORTCUT_WARNING:g}%"
    verdict = (f"<p class='limits'>Edits that should not matter change more than {limit} of the calls: "
               f"{e(', '.join(flagged))}. The model reads them, and where they differ (another site or device) "
               "its calls will move. Training with <code>--augment site-aspect</code> (Lite0's default) reduces this; "
               "check the model's Grad-CAM maps, and refit its operating point on that site's images "
               "(<code>cxr calibrate</code>) before use.</p>" if flagged else
               f"<p>No edit changed more than {limit} of the calls.</p>")
    negative_class = next((name for name in class_names if name != positive_class), "")
    header = "<th>edit</th><th>calls changed</th>" + (
        f"<th>{e(negative_class)} images called {e(positive_class)}: as they are &rarr; edited</th>" if binary else "")
    return f"""<h2>Shortcut check: what lies outside the lungs, and proportions</h2>
<p>Each edit below changes only what lies outside the lungs or the image's proportions (as markers,
collimation, framing and detector shapes differ between devices and sites) on {check['n_images']} of the
evaluated images. A model that reads the lungs keeps its calls.</p>
<table><tr>{header}</tr>{rows}</table>{verdict}"""


def _setting(value):
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "none" if value is None else str(value)


def package_version(*distributions):
    """The installed version of the first of `distributions` that is installed, else None."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _number(value, digits=6):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def _interval(ci):
    if not ci or ci[0] is None:
        return "n/a"
    return f"{ci[0]:.3f} to {ci[1]:.3f}"
