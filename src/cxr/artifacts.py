"""Where a run's outputs go, and writing them so that an interrupted run leaves no half-written file.

Checkpoints are written by Keras into a staging folder during training and moved into models/ at the end.
"""

import csv
import io
import json
import importlib.metadata
import os
import platform
import shutil
import tempfile
from pathlib import Path

from cxr.atomic import atomic_path, write_bytes, write_json, write_text
from cxr.errors import UserError

CLASS_NAMES_FILE = "class_names.json"


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

    def prepare(self, training=True):
        """Create the folders (models/ and logs/ only for training), or raise UserError if they can't be written."""
        folders = (self.models, self.reports, self.plots, self.logs, self.cache) if training else (
            self.reports, self.plots, self.cache)
        try:
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as error:
            raise UserError(f"{self.root}: output folder is not writable ({error.strerror}); "
                            "choose another with --output-dir") from None
        if training:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        return self


def save_model(model, path):
    with atomic_path(path) as tmp:
        model.save(tmp)


def publish_staged(outputs):
    """Move the checkpoints Keras wrote during training into models/."""
    for checkpoint in outputs.staging.glob("*.keras"):
        os.replace(checkpoint, outputs.models / checkpoint.name)
    shutil.rmtree(outputs.staging, ignore_errors=True)


def write_evaluation(outputs, evaluation, title, subtitle, counts, operating_point, config, extra_figures=()):
    """reports/{metrics.csv, classification_report.csv, report.html} and every figure as plots/<name>.png."""
    from cxr.evaluate.report import classification_rows, metric_rows, render_html

    figures = {**evaluation.figures, **dict(extra_figures)}
    for name, png in figures.items():
        write_bytes(outputs.plots / f"{name}.png", png)
    write_csv(metric_rows(_headline(evaluation.metrics), evaluation.confidence_intervals),
              outputs.reports / "metrics.csv")
    write_csv(classification_rows(evaluation.classification), outputs.reports / "classification_report.csv")
    write_text(outputs.reports / "report.html",
               render_html(title, subtitle, counts, operating_point, evaluation.calibration,
                           _headline(evaluation.metrics), evaluation.confidence_intervals, config, figures))


def _headline(metrics):
    """The scalar metrics that have intervals ("auc" stays in summary.json for scripts; it equals auc_roc)."""
    return {k: v for k, v in metrics.items() if k not in ("auc", "per_class", "confusion_matrix", "n_images")}


def write_csv(rows, path):
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    write_text(path, buffer.getvalue())


def write_splits(path, class_names, paths, data):
    """splits.csv: the split and class of every image the run used, so a carved test set can be audited."""
    rows = [("split", "class", "path")]
    for split, (image_rows, labels) in data.items():
        rows += [(split, class_names[y], str(paths[r])) for r, y in zip(image_rows, labels)]
    write_csv(rows, path)


def write_model_info(models_dir, class_names, **extra):
    """class_names.json beside the models: output order, plus anything predict needs to use them."""
    write_json(Path(models_dir) / CLASS_NAMES_FILE, {"class_names": list(class_names), **extra})


def read_model_info(model_path):
    """The class names (and extras) saved beside `model_path`."""
    info_path = Path(model_path).parent / CLASS_NAMES_FILE
    if not info_path.is_file():
        raise UserError(f"{info_path}: not found; predict needs the {CLASS_NAMES_FILE} that training wrote "
                        "beside the model")
    info = json.loads(info_path.read_text())
    return info if isinstance(info, dict) else {"class_names": info}


def saved_operating_point(info):
    """The operating point stored in class_names.json; models saved without one use argmax, uncalibrated."""
    from cxr.inference import positive_class

    defaults = {"positive_class": positive_class(info["class_names"]), "temperature": 1.0, "threshold": None,
                "method": "argmax"}
    return defaults | {k: v for k, v in info.items() if k not in ("class_names", "img_size", "backbone")}


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


def summary(class_names, counts, evaluation, operating_point, config, **extra):
    """summary.json: the keys of the artifact contract (ARCHITECTURE.md) first, then `extra` (timings, history)."""
    return {
        "class_names": list(class_names),
        "counts": counts,
        "metrics": evaluation.metrics,
        "confidence_intervals": evaluation.confidence_intervals,
        "operating_point": operating_point,
        "calibration": evaluation.calibration,
        "config": config,
        "versions": versions(),
        **extra,
    }
