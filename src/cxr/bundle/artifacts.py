"""Where a run's outputs go, and writing them so that an interrupted run leaves no half-written file.

Checkpoints are written by Keras into a staging folder during training and moved into models/ at the end.
"""

import atexit
import csv
import io
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from cxr.atomic import spreadsheet_safe, write_bytes, write_text
from cxr.errors import UserError

LOCK_FILE = ".cxr-lock"


class Outputs:
    """The output folder's layout: models/, reports/, plots/, logs/ and the decode cache."""

    def __init__(self, root):
        self.root = Path(root)
        self.models = self.root / "models"
        self.reports = self.root / "reports"
        self.plots = self.root / "plots"
        self.logs = self.root / "logs"
        self.cache = self.root / "cache"
        self.staging = self.models / ".staging"

    def prepare(self, training=True, resume=False):
        """Create the folders (models/ and logs/ only for training) and hold the folder for this process;
        UserError if they can't be written or another live cxr process holds them.

        Leftovers of a killed run (temporary `*.partial*` files) are removed once the folder is held; its
        staging folder (checkpoints, cached frozen-layer outputs, resume state) only when not resuming it.
        """
        folders = (self.models, self.reports, self.plots, self.logs, self.cache) if training else (
            self.reports, self.plots, self.cache)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: is a file, not a folder; give --output-dir a folder (new or existing)")
        try:
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as error:
            raise UserError(f"{self.root}: output folder is not writable ({error.strerror}); "
                            "choose another with --output-dir") from None
        self.lock()
        for folder in (self.models, self.reports, self.plots, self.cache):
            for leftover in folder.glob(".*.partial*") if folder.is_dir() else ():
                leftover.unlink(missing_ok=True)
        if training and not resume:
            shutil.rmtree(self.staging, ignore_errors=True)
        if training:
            self.staging.mkdir(exist_ok=True)
        return self

    def lock(self):
        """Hold the output folder for this process (a lock file with its PID, removed at exit).

        A lock whose process is gone (killed, power loss) is stale and taken over.
        """
        path = self.root / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(path)
                if holder == os.getpid():
                    return self
                if holder is not None and _alive(holder):
                    raise UserError(f"{self.root}: in use by PID {holder} (another cxr run writing here); wait for "
                                    "it to finish or choose another --output-dir") from None
                path.unlink(missing_ok=True)  # stale
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            atexit.register(_release, path, os.getpid())
            return self


def worker_folder():
    """A new temporary output folder for a multi-worker job's non-chief worker; the folders of killed workers
    (their lock's process gone) are removed first, since they may hold large cached layer outputs."""
    for old in Path(tempfile.gettempdir()).glob("cxr-worker-*"):
        holder = _lock_holder(old / LOCK_FILE)
        if holder is None or not _alive(holder):
            shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix="cxr-worker-")
    Outputs(folder).lock()  # at once: another worker starting on this machine must not take it for a dead one's
    return folder


def _lock_holder(path):
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _release(path, pid):
    if _lock_holder(path) == pid:
        path.unlink(missing_ok=True)


def refuse_training_run(outputs):
    """UserError when `outputs` holds a training run's reports, which an evaluation would overwrite."""
    summary_path = outputs.reports / "summary.json"
    try:
        trained = "history" in json.loads(summary_path.read_text())
    except (OSError, ValueError):
        trained = False
    if trained:
        raise UserError(f"{outputs.root}: holds a training run's reports, which this would overwrite; choose "
                        f"another --output-dir (e.g. {outputs.root}/evaluation)")


def publish_model(model, outputs):
    """models/model.h5 and class_names.json (a `SavedModel`), and the checkpoints Keras staged during training."""
    model.save(outputs.models)
    for checkpoint in outputs.staging.glob("*.keras"):
        os.replace(checkpoint, outputs.models / checkpoint.name)
    shutil.rmtree(outputs.staging, ignore_errors=True)


def write_evaluation(outputs, evaluation, context):
    """reports/{metrics.csv, classification_report.csv, report.html} and every figure as plots/<name>.png.

    `context` is an `evaluate.report.ReportContext`: the title, counts and settings around the evaluation.
    """
    from cxr.evaluate.report import classification_rows, metric_rows, render_html

    figures = {**evaluation.figures, **context.extra_figures}
    for name, png in figures.items():
        write_bytes(outputs.plots / f"{name}.png", png)
    write_csv(metric_rows(_headline(evaluation.metrics), evaluation.confidence_intervals),
              outputs.reports / "metrics.csv")
    write_csv(classification_rows(evaluation.classification), outputs.reports / "classification_report.csv")
    write_text(outputs.reports / "report.html",
               render_html(context, evaluation, _headline(evaluation.metrics), figures))


def _headline(metrics):
    """The scalar metrics that have intervals ("auc" stays in summary.json for scripts; it equals auc_roc), and
    a multi-label model's per-finding ones as "<finding> <metric>"."""
    flat = {f"{name} {k}": v for name, values in metrics.get("per_finding", {}).items() for k, v in values.items()
            if k not in ("status", "threshold")}
    return {k: v for k, v in metrics.items()
            if k not in ("auc", "per_class", "per_finding", "confusion_matrix", "n_images")} | flat


def write_predictions(path, evaluation, paths, y):
    """predictions.csv: one row per evaluated image (`paths`, true labels `y`: class indices, or a labels matrix
    with NaN unknown): the truth, the call, every calibrated probability and the population check's flag.
    Cells a spreadsheet would run are neutralised, as in every CSV cxr writes."""
    names, task = list(evaluation.class_names), evaluation.task
    flagged = evaluation.in_distribution
    per_finding = task.multi_label  # a column per finding for the truth and the call, else the class named
    header = ["path", *((f"true_{n}" for n in names) if per_finding else ["true"]),
              *((f"called_{n}" for n in names) if per_finding else ["label"]), *(f"p_{n}" for n in names),
              "in_distribution"]
    rows = [header]
    for k, image in enumerate(paths):
        truth = ["" if v != v else int(v) for v in y[k]] if per_finding else [names[int(y[k])]]
        call = [int(v) for v in evaluation.predictions[k]] if per_finding else task.called(evaluation.predictions[k])
        rows.append([str(image), *truth, *call, *(f"{p:.6f}" for p in evaluation.probabilities[k]),
                     "" if flagged is None else bool(flagged[k])])
    write_csv(rows, path)


def write_csv(rows, path):
    buffer = io.StringIO()
    csv.writer(buffer).writerows([[spreadsheet_safe(cell) for cell in row] for row in rows])
    write_text(path, buffer.getvalue())


def write_splits(path, dataset):
    """splits.csv: the split and class of every image the run used, so a carved test set can be audited; for a
    multi-label dataset the split, the path and one column per finding (1, 0, blank for unknown)."""
    if dataset.multi_label:
        rows = [("split", "path", *dataset.class_names)]
        for split, image_rows in dataset.splits.items():
            rows += [(split, str(dataset.paths[r]), *("" if v != v else int(v) for v in dataset.labels[r]))
                     for r in image_rows]
        return write_csv(rows, path)
    rows = [("split", "class", "path")]
    for split in dataset.splits:
        image_rows, labels = dataset.split(split)
        rows += [(split, dataset.class_names[y], str(dataset.paths[r])) for r, y in zip(image_rows, labels)]
    write_csv(rows, path)


def versions():
    import keras
    import numpy
    import sklearn
    import tensorflow

    import cxr

    try:
        litert = importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        litert = None
    return {"cxr": cxr.__version__, "tensorflow": tensorflow.__version__, "keras": keras.__version__,
            "ai-edge-litert": litert, "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def summary(evaluation, context, **extra):
    """summary.json: the keys of the artifact contract (ARCHITECTURE.md) first, then `extra` (timings, history)."""
    return {
        "class_names": list(evaluation.class_names),
        "counts": context.counts,
        "metrics": evaluation.metrics,
        "confidence_intervals": evaluation.confidence_intervals,
        "operating_point": evaluation.operating_point,
        "calibration": evaluation.calibration,
        "shortcut_check": evaluation.shortcuts,
        "subgroups": evaluation.subgroups,
        "population_check": evaluation.population,
        "cautions": evaluation.cautions,
        "config": context.settings,
        "versions": versions(),
        **extra,
    }
