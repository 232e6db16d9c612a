"""`cxr monitor`: the prediction log of a deployed model, window by window, against its reference.

Reads the answers `--monitor-db` logged for one model (`cxr.monitor.log`), cuts them into windows of N answers
or D days, judges each (`cxr.monitor.drift`) and writes OUTPUT/monitor.json and a self-contained
OUTPUT/monitor.html (the alerts first, then timelines with the reference, then each window's numbers).
"""

import csv
import datetime
import html
from dataclasses import asdict, dataclass
from pathlib import Path

from cxr.atomic import write_json, write_text
from cxr.errors import UserError

DEFAULT_WINDOW = 500


@dataclass(frozen=True)
class MonitorOptions:
    window: int = None  # answers per window (default DEFAULT_WINDOW, unless window_days)
    window_days: float = None
    since: datetime.datetime = None
    labels: Path = None  # confirmed labels CSV
    reference_data: Path = None  # labelled images to build a reference for a model saved without one
    thresholds: object = None  # a `cxr.monitor.drift.Thresholds`; None: the defaults


def monitor(db, model_path, output_dir, options=MonitorOptions()):
    """monitor.json's content, after writing it and monitor.html into `output_dir`."""
    from sqlalchemy import select

    from cxr.bundle.saved_model import SavedModel
    from cxr.monitor import drift
    from cxr.monitor.log import open_database, tables

    model = SavedModel.load(model_path)
    reference = reference_of(model, model_path, options.reference_data)
    engine, salt = open_database(db)
    _, predictions, _ = tables()
    query = select(predictions).where(predictions.c.model_sha256 == model.sha256).order_by(predictions.c.id)
    if options.since is not None:
        query = query.where(predictions.c.time >= options.since)
    labels = read_labels(options.labels, salt, reference) if options.labels else None
    positive = model.operating_point.get("positive_class")  # None for a model of findings
    thresholds = options.thresholds or drift.Thresholds()
    with engine.connect() as connection:  # rows streamed, one window in memory at a time
        rows = connection.execution_options(yield_per=10_000).execute(query).mappings()
        windows = [drift.judge(w, reference, positive, labels, thresholds) for w in cut(map(dict, rows), options)]
    engine.dispose()
    if not windows:
        raise UserError(f"{db}: no answers of {model_path} (SHA-256 {model.sha256[:12]}...) logged"
                        f"{' since ' + options.since.isoformat() if options.since else ''}; serve or predict with "
                        "--monitor-db first")
    result = {"model": str(model_path), "model_sha256": model.sha256, "answers": sum(w["n"] for w in windows),
              "windows": windows, "alerts": windows[-1]["alerts"], "thresholds": asdict(thresholds)}
    output_dir = Path(output_dir)
    write_json(output_dir / "monitor.json", result)
    write_text(output_dir / "monitor.html", render(result))
    return result


def reference_of(model, model_path, reference_data):
    """The model's validation reference, or one built from the labelled images in `reference_data`."""
    from cxr.monitor.reference import Reference

    if reference_data is None:
        return Reference.load(model_path, model.sha256)
    from cxr.data.split import read_labelled_folder

    dataset = read_labelled_folder(reference_data, model.class_names, split="reference")
    dataset.decode(model.img_size, Path(reference_data) / ".cxr-cache")
    rows, y = dataset.split("reference")
    return Reference.of_validation(model, dataset.images, rows, y, dataset.files("reference"))


def cut(rows, options):
    """The windows (lists of rows) of the time-ordered `rows`, one at a time: `options.window` answers each, or
    `options.window_days` days each (from the first answer)."""
    span = datetime.timedelta(days=options.window_days) if options.window_days else None
    size = options.window or DEFAULT_WINDOW
    window, start = [], None
    for row in rows:
        if span is not None:
            start = row["time"] if start is None else start
            if row["time"] >= start + span:
                start += span * ((row["time"] - start) // span)
                yield window
                window = []
        elif len(window) == size:
            yield window
            window = []
        window.append(row)
    if window:
        yield window


KEY_COLUMNS = {"path": "path", "sop_instance_uid": "uid", "image_id": "id", "image_key": None}


def read_labels(path, salt, reference):
    """{image_key: class name, or {finding: 0/1}} from a confirmed-labels CSV; its image column (path,
    sop_instance_uid, image_id or image_key) is hashed as the log hashed it."""
    from cxr.monitor.log import image_key

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: can't read it ({error}); give a CSV with an image column and the labels") from None
    header = list(table[0]) if table else []
    column = next((c for c in KEY_COLUMNS if c in header), None)
    if column is None:
        raise UserError(f"{path}: no image column; name one of {', '.join(KEY_COLUMNS)}")
    findings = [f for f in reference.class_names if f in header]
    if reference.multi_label and not findings:
        raise UserError(f"{path}: no column of any finding ({', '.join(reference.class_names)}); give 1/0 columns")
    if not reference.multi_label and "label" not in header:
        raise UserError(f"{path}: no label column; give each image's class ({', '.join(reference.class_names)})")
    labels = {}
    for line, row in enumerate(table, start=2):
        value = (row[column] or "").strip()
        if not value:
            continue
        kind = KEY_COLUMNS[column]
        key = value if kind is None else image_key(salt, kind, str(Path(value)) if kind == "path" else value)
        if reference.multi_label:
            labels[key] = {f: int(float(row[f])) for f in findings if (row[f] or "").strip() not in ("", "nan")}
        elif row["label"] in reference.class_names:
            labels[key] = row["label"]
        else:
            raise UserError(f"{path}, row {line}: label {row['label']!r} is not a class of the model "
                            f"({', '.join(reference.class_names)})")
    return labels


def render(result):
    """monitor.html: the alerts of the latest window first, the timelines, then each window's numbers."""
    e = html.escape
    latest = result["alerts"]
    alerts = ("".join(f"<li><b>{e(a['signal'])}</b>: {e(a['message'])}</li>" for a in latest)
              if latest else "<li>None in the latest window.</li>")
    rows = []
    for k, w in enumerate(result["windows"], 1):
        flagged = w.get("flagged")
        outputs = "; ".join(f"{e(name)}: called {o['call_rate']:.0%} (validation {o['reference_call_rate']:.0%}), "
                            f"PSI {o['psi']:.2f}" for name, o in w.get("outputs", {}).items())
        share = "" if not flagged else f"{flagged['share']:.1%}"
        moved = max(w.get("inputs", {}).items(), key=lambda item: item[1]["distance"], default=None)
        inputs = "" if moved is None else f"{e(moved[0].replace('_', ' '))}: {moved[1]['distance']:.2f}"
        said = "".join(f"<p class='alert'>{e(a['message'])}</p>" for a in w["alerts"]) or "none"
        if w.get("judged"):
            said += f"<p class='note'>{e(w['judged'])}</p>"
        rows.append(f"<tr><td>{k}</td><td>{e(w['start'][:16].replace('T', ' '))}<br>"
                    f"{e(w['end'][:16].replace('T', ' '))}</td><td>{w['n']}</td><td>{share}</td>"
                    f"<td class='wrap'>{outputs}</td><td>{inputs}</td><td class='wrap'>{said}</td></tr>")
    timeline = timeline_png(result)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cxr monitor</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; vertical-align: top; }}
td.wrap {{ white-space: normal; text-align: left; }}
td p {{ margin: 0 0 0.3em; }}
p.alert {{ color: #a00; }}
p.note {{ color: #666; }}
table {{ width: 100%; }}
th {{ background: #f3f3f3; text-align: left; }}
.alerts {{ background: {'#fde8e8' if latest else '#e8f6e8'}; border-left: 4px solid {'#c00' if latest else '#080'};
          padding: 0.5em 1.5em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>cxr monitor</h1>
<p>{e(result['model'])} (SHA-256 {e(result['model_sha256'][:16])}...): {result['answers']} logged answers in
{len(result['windows'])} windows, each against what the model answered on its validation split.</p>
<section class="alerts"><h2>Alerts in the latest window</h2><ul>{alerts}</ul></section>
<h2>Timelines</h2>
<img alt="timelines" src="data:image/png;base64,{timeline}">
<h2>Windows</h2>
<table><tr><th>window</th><th>from, to</th><th>answers</th><th>flagged</th><th>calls and score drift</th>
<th title="total variation distance from validation's mix">input mix moved most</th><th>alerts</th></tr>
{''.join(rows)}</table>
</body></html>
"""


def timeline_png(result):
    """Base64 PNG: per window, the share flagged and each output's call rate and PSI, with validation's value."""
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxr.evaluate.plots import figure_png

    t = result["thresholds"]
    windows = result["windows"]
    x = range(1, len(windows) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    flagged = [w.get("flagged", {}).get("share") for w in windows]
    axes[0].plot(x, [f if f is not None else float("nan") for f in flagged], "o-", label="flagged")
    reference = next((w["flagged"]["reference"] for w in windows if "flagged" in w), None)
    if reference is not None:
        axes[0].axhline(max(t["flagged"], t["flagged_factor"] * reference), color="crimson", linestyle="--",
                        label="alert above")
    axes[0].set_title("Share flagged by the population check")
    names = sorted({name for w in windows for name in w.get("outputs", {})})
    for name in names:
        rates = [w["outputs"][name]["call_rate"] if name in w.get("outputs", {}) else float("nan") for w in windows]
        line, = axes[1].plot(x, rates, "o-", label=name)
        expected = next(w["outputs"][name]["reference_call_rate"] for w in windows if name in w.get("outputs", {}))
        axes[1].axhline(expected, color=line.get_color(), linestyle=":")
        axes[2].plot(x, [w["outputs"][name]["psi"] if name in w.get("outputs", {}) else float("nan")
                         for w in windows], "o-", label=name)
    axes[1].set_title("Call rate (dotted: validation)")
    axes[2].axhline(t["psi"], color="crimson", linestyle="--", label="alert above")
    axes[2].set_title("Score drift (PSI)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("window")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return base64.b64encode(figure_png(fig)).decode("ascii")
