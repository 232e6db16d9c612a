"""A model's probabilities for images, and the saved operating point applied to them.

Plain numpy on top of any predictor (a Keras model or `litert.fast_inference`'s twin), so `cxr predict`
starts without matplotlib, scikit-learn or SciPy, whose imports were most of its start-up time
(benchmarks/README.md). Fitting the operating point needs them and lives in `evaluate.metrics`.
"""

import datetime
from pathlib import Path

import numpy as np

from cxr.errors import UserError
from cxr.progress import progress

TINY = 1e-12  # probabilities are clipped to [TINY, 1 - TINY] before a log


def predict_outputs(model, images, rows=None, batch_size=32, tta=False):
    """`model`'s (n, outputs) outputs for `images[rows]` (uint8, N x H x W x 3); with `tta`, averaged with the
    mirror image's."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    batches = []
    # one batch (a served request, a chunk of cxr predict) has nothing to count: no bar on the serving path
    with progress(total=len(rows), desc="Predicting", show=len(rows) > batch_size) as bar:
        for start in range(0, len(rows), batch_size):
            x = np.asarray(images[rows[start:start + batch_size]], dtype=np.float32)
            p = np.asarray(model.predict_on_batch(x), dtype=np.float64)
            if tta:
                p = (p + np.asarray(model.predict_on_batch(x[:, :, ::-1]), dtype=np.float64)) / 2
            batches.append(p)
            bar.update(len(x))
    return np.concatenate(batches) if batches else np.zeros((0, model.output_shape[-1]))


def positive_class(class_names, requested=None):
    """`requested` if it is a class; by default PNEUMONIA if there is one, else the second class."""
    if requested is None:
        return "PNEUMONIA" if "PNEUMONIA" in class_names else class_names[1]
    if requested not in class_names:
        raise UserError(f"--positive-class {requested!r} is not one of the classes ({', '.join(class_names)}); "
                        "give one of those names")
    return requested


def apply_temperature(probabilities, temperature):
    """softmax(log p / T): the model's logits up to a constant, so this is temperature scaling on its output."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), TINY, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def apply_finding_temperatures(probabilities, temperatures):
    """sigmoid(logit(p) / T) per finding: temperature scaling of (n, findings) sigmoid outputs, `temperatures`
    (findings,)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), TINY, 1 - TINY)
    return 1 / (1 + np.exp(-(np.log(p) - np.log1p(-p)) / np.asarray(temperatures, dtype=np.float64)))


def decide_findings(probabilities, thresholds):
    """(n, findings) 1 where a finding's calibrated probability reaches its threshold, else 0."""
    return (np.asarray(probabilities) >= np.asarray(thresholds, dtype=np.float64)).astype(np.int64)


def decide(probabilities, positive_index=None, threshold=None):
    """Predicted class per row: the positive class when its probability >= threshold (binary), else argmax."""
    if threshold is None or probabilities.shape[1] != 2:
        return probabilities.argmax(axis=1)
    negative_index = 1 - positive_index
    return np.where(probabilities[:, positive_index] >= threshold, positive_index, negative_index)


def fitted_on(description, data_dir, counts, same_data=None):
    """Where an operating point was fitted, stored as its "fitted_on": which data, how many images, when.

    `same_data`: the folders whose images count as that data (a training run's train/, val/ and test/ folders,
    the images it split between them); by default `data_dir`.
    """
    folders = same_data if same_data is not None else [data_dir]
    return {"description": description, "data_dir": str(Path(data_dir).resolve()),
            "same_data": sorted({str(Path(f).resolve()) for f in folders}), "counts": counts,
            "date": datetime.date.today().isoformat()}


def describe_fitted_on(operating_point):
    """One phrase for reports and messages: 'the validation split of data/ (783 images, 2026-11-25)'."""
    source = operating_point.get("fitted_on")
    if not source:
        return ("nothing (no operating point was saved: argmax, uncalibrated)" if operating_point.get("method") == "argmax"
                else "its training run's validation split (not recorded in this model's class_names.json)")
    images = sum(per_class["images"] if "images" in per_class else sum(per_class.values())
                 for per_class in source["counts"].values())
    return f"{source['description']} ({images} images, {source['date']})"
