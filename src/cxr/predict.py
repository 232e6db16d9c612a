"""Labels and calibrated probabilities for image files, from a saved model and the operating point beside it."""

import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr.artifacts import read_model_info, saved_operating_point
from cxr.data.pipeline import load_image
from cxr.data.split import is_image_file
from cxr.errors import UserError, list_paths, warn
from cxr.inference import apply_temperature, decide, predict_probabilities
from cxr.litert import saved_model_inference


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


def predict_files(model, files, batch_size=64, tta=False):
    """The readable files, in order, and the model's raw softmax outputs (N, classes) for them.

    `model` is a Keras model or anything with its `predict_on_batch`, `input_shape` and `output_shape`
    (`litert.fast_inference`). The next chunk of files is decoded in threads while the model runs on this one.
    """
    size = model.input_shape[1]

    def load(path):
        try:
            return load_image(path, size)
        except (OSError, ValueError):
            return None

    chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
    probabilities, readable, unreadable = [], [], []
    with ThreadPoolExecutor() as pool:
        pending = [pool.submit(load, path) for path in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            images = [future.result() for future in pending]
            pending = [pool.submit(load, path) for path in chunks[k + 1]] if k + 1 < len(chunks) else []
            batch = [img for img in images if img is not None]
            readable += [p for p, img in zip(chunk, images) if img is not None]
            unreadable += [p for p, img in zip(chunk, images) if img is None]
            if batch:
                probabilities.append(predict_probabilities(model, np.stack(batch), batch_size=len(batch), tta=tta))
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable images: {list_paths(unreadable)}")
    return readable, (np.concatenate(probabilities) if probabilities else np.zeros((0, model.output_shape[-1])))


def format_predictions(files, probabilities, labels, class_names, fmt="table"):
    """One record per file: the label, its probability and every class's probability."""
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


def classify(raw, point, class_names):
    """Calibrated probabilities and labels at the saved operating point (the threshold for binary models)."""
    probabilities = apply_temperature(raw, point["temperature"])
    return probabilities, decide(probabilities, class_names.index(point["positive_class"]), point["threshold"])


def run_predict(paths, model_path, fmt="table", batch_size=64, tta=False):
    files = list_inputs(paths)
    info = read_model_info(model_path)
    predictor, _ = saved_model_inference(model_path, load_model)
    readable, raw = predict_files(predictor, files, batch_size, tta)
    probabilities, labels = classify(raw, saved_operating_point(info), info["class_names"])
    return format_predictions(readable, probabilities, labels, info["class_names"], fmt)


def run_explain(paths, model_path, output_dir, class_name=None, tta=False):
    """Write one Grad-CAM overlay PNG per image into `output_dir`; returns the written paths."""
    from cxr.atomic import write_bytes
    from cxr.evaluate import gradcam, plots

    files = list_inputs(paths)
    info = read_model_info(model_path)
    class_names = info["class_names"]
    if class_name is not None and class_name not in class_names:
        raise UserError(f"--class {class_name!r} is not one of the model's classes ({', '.join(class_names)})")
    model = load_model(model_path)
    readable, raw = predict_files(model, files, tta=tta)
    point = saved_operating_point(info)
    probabilities, labels = classify(raw, point, class_names)
    targets = labels if class_name is None else np.full(len(readable), class_names.index(class_name))
    size = model.input_shape[1]
    written = []
    for path, prob, label, target in zip(readable, probabilities, labels, targets):
        heatmap = gradcam.heatmaps(model, load_image(path, size)[None], [target])[0]
        shown = load_image(path, max(size, 512))  # overlay on a sharper copy than the model's input
        title = f"{path.name}\npredicted {class_names[label]} (p = {prob[label]:.3f})"
        if target != label:
            title += f"; map for {class_names[target]}"
        out = Path(output_dir) / f"{path.stem}.gradcam.png"
        write_bytes(out, plots.figure_png(plots.explanation_figure(gradcam.overlay(shown, heatmap), title)))
        written.append(out)
    return written
