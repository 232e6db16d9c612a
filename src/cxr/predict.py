"""Class probabilities for image files from a saved model and the class names saved beside it."""

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr.artifacts import read_model_info
from cxr.data.pipeline import load_image
from cxr.data.split import is_image_file
from cxr.errors import UserError, list_paths, warn


def list_inputs(paths):
    """Image files named by `paths`; a folder stands for every image under it."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))
            if not found:
                raise UserError(f"{path}: no images (.jpg, .jpeg, .png, .bmp) in this folder")
            files += found
        elif path.is_file():
            if not is_image_file(path):
                raise UserError(f"{path}: not an image file; give .jpg, .jpeg, .png or .bmp files or a folder")
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def load_model(model_path):
    import keras

    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such model file; train one first or pass --model PATH")
    try:
        return keras.models.load_model(model_path, compile=False)
    except Exception as error:
        raise UserError(f"{model_path}: could not load the model ({str(error).splitlines()[0][:160]})") from None


def predict_files(model, files, batch_size=64):
    """Probabilities (N, classes) for readable files, in order, and the list of unreadable files."""
    size = model.input_shape[1]

    def load(path):
        try:
            return load_image(path, size)
        except (OSError, ValueError):
            return None

    probabilities, readable, unreadable = [], [], []
    with ThreadPoolExecutor() as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = list(pool.map(load, chunk))
            batch = [img for img in images if img is not None]
            readable += [p for p, img in zip(chunk, images) if img is not None]
            unreadable += [p for p, img in zip(chunk, images) if img is None]
            if batch:
                probabilities.append(np.asarray(model.predict_on_batch(np.stack(batch).astype("float32"))))
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable images: {list_paths(unreadable)}")
    return readable, (np.concatenate(probabilities) if probabilities else np.zeros((0, model.output_shape[-1])))


def format_predictions(files, probabilities, class_names, fmt="table"):
    labels = probabilities.argmax(axis=1)
    records = [{"path": str(p), "label": class_names[k], "probability": float(prob[k]),
                **{f"p_{name}": float(prob[i]) for i, name in enumerate(class_names)}}
               for p, k, prob in zip(files, labels, probabilities)]
    if fmt == "json":
        return json.dumps(records, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "label", "probability", *(f"p_{n}" for n in class_names)])
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue().rstrip("\n")
    width = max([len(r["path"]) for r in records] + [4])
    lines = [f"{'path':{width}}  {'label':12}  probability"]
    lines += [f"{r['path']:{width}}  {r['label']:12}  {r['probability']:.4f}" for r in records]
    return "\n".join(lines)


def run_predict(paths, model_path, fmt="table", batch_size=64):
    files = list_inputs(paths)
    class_names = read_model_info(model_path)["class_names"]
    model = load_model(model_path)
    readable, probabilities = predict_files(model, files, batch_size)
    return format_predictions(readable, probabilities, class_names, fmt)
