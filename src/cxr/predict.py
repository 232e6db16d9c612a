"""Labels and calibrated probabilities for image files (`cxr predict`), and Grad-CAM overlays (`cxr explain`),
from a `SavedModel`."""

import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr.data.decode import IMAGE_KINDS, describe_skipped, is_image_file, try_decode
from cxr.data.split import walk_files
from cxr.errors import UserError, warn
from cxr.saved_model import SavedModel


def list_inputs(paths):
    """Image files named by `paths`; a folder stands for every image under it."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [p for p in walk_files(path) if is_image_file(p)]
            if not found:
                raise UserError(f"{path}: no images ({IMAGE_KINDS}) in this folder")
            files += found
        elif path.is_file():
            if not is_image_file(path):
                raise UserError(f"{path}: not an image file; give {IMAGE_KINDS} files or a folder")
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def predict_files(model, files, batch_size=64, tta=False):
    """The readable files, in order, and (calibrated probabilities (n, classes), labels (n,)) for them.

    `model` is a `SavedModel`. The next chunk of files is decoded in threads while the model runs on this one.
    """
    size = model.predictor().input_shape[1]
    chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
    raw, readable, unreadable = [], [], {}
    with ThreadPoolExecutor() as pool:
        pending = [pool.submit(try_decode, path, size) for path in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            results = [future.result() for future in pending]
            pending = [pool.submit(try_decode, path, size) for path in chunks[k + 1]] if k + 1 < len(chunks) else []
            batch = [img for img, _ in results if img is not None]
            readable += [p for p, (img, _) in zip(chunk, results) if img is not None]
            unreadable |= {p: reason for p, (img, reason) in zip(chunk, results) if img is None}
            if batch:
                raw.append(model.raw_probabilities(np.stack(batch), batch_size=len(batch), tta=tta))
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable or refused images: {describe_skipped(unreadable)}")
    probabilities, labels = model.calibrate(np.concatenate(raw) if raw else np.zeros((0, len(model.class_names))))
    return readable, probabilities, labels


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


def run_predict(paths, model_path, fmt="table", batch_size=64, tta=False):
    files = list_inputs(paths)
    model = SavedModel.load(model_path)
    model.predictor()  # LiteRT whenever it can run the model: the conversion is cached for the next call
    readable, probabilities, labels = predict_files(model, files, batch_size, tta)
    return format_predictions(readable, probabilities, labels, model.class_names, fmt)


def run_explain(paths, model_path, output_dir, class_name=None, tta=False):
    """Write one Grad-CAM overlay PNG per image into `output_dir`; returns the written paths."""
    from cxr.atomic import write_bytes
    from cxr.data.decode import decode_image
    from cxr.evaluate import gradcam, plots

    files = list_inputs(paths)
    model = SavedModel.load(model_path)
    class_names = model.class_names
    if class_name is not None and class_name not in class_names:
        raise UserError(f"--class {class_name!r} is not one of the model's classes ({', '.join(class_names)})")
    model.predictor(n_images=len(files) * (2 if tta else 1))
    readable, probabilities, labels = predict_files(model, files, tta=tta)
    targets = labels if class_name is None else np.full(len(readable), class_names.index(class_name))
    size = model.keras_model.input_shape[1]
    written = []
    names = overlay_names(readable)
    for path, prob, label, target in zip(readable, probabilities, labels, targets):
        heatmap = gradcam.heatmaps(model.keras_model, decode_image(path, size)[None], [target])[0]
        shown = decode_image(path, max(size, 512))  # overlay on a sharper copy than the model's input
        title = f"{path.name}\npredicted {class_names[label]} (p = {prob[label]:.3f})"
        if target != label:
            title += f"; map for {class_names[target]}"
        out = Path(output_dir) / names[path]
        write_bytes(out, plots.figure_png(plots.explanation_figure(gradcam.overlay(shown, heatmap), title)))
        written.append(out)
    return written


def overlay_names(paths):
    """{path: output file name}: STEM.gradcam.png, or, where stems clash (a/scan.jpeg, a/scan.png,
    b/scan.jpeg), the path below the inputs' common folder with '__' for '/', e.g. a__scan.jpeg.gradcam.png."""
    stems = [Path(p).stem for p in paths]
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in resolved])) if paths else Path()
    return {p: f"{stem}.gradcam.png" if stems.count(stem) == 1
            else "__".join(r.relative_to(common).parts) + ".gradcam.png"
            for p, stem, r in zip(paths, stems, resolved)}
