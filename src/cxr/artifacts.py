"""Where a run's outputs go, and writing them so that an interrupted run leaves no half-written file.

Checkpoints are written by Keras into a staging folder during training and moved into models/ at the end.
"""

import csv
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from cxr.atomic import atomic_path, write_json, write_text
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

    def prepare(self):
        """Create the folders, or raise UserError when the output folder can't be written."""
        try:
            for folder in (self.models, self.reports, self.plots, self.logs, self.cache):
                folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as error:
            raise UserError(f"{self.root}: output folder is not writable ({error.strerror}); "
                            "choose another with --output-dir") from None
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


def save_figure(figure, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)


def write_csv(rows, path):
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    write_text(path, buffer.getvalue())


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


def versions():
    import keras
    import numpy
    import sklearn
    import tensorflow

    import cxr

    return {"cxr": cxr.__version__, "tensorflow": tensorflow.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def summary(class_names, counts, test_metrics, seconds, config, history, final_phase):
    return {
        "class_names": list(class_names),
        "counts": counts,
        "metrics": test_metrics,
        "timings": {k: round(v, 2) for k, v in seconds.items()},
        "config": config.to_dict(),
        "versions": versions(),
        "final_phase": final_phase,
        "history": history,
    }
