"""Labels and calibrated probabilities for image files (`cxr predict`), and Grad-CAM overlays (`cxr explain`),
from a `SavedModel`."""

import csv
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.data.decode import IMAGE_KINDS, UnreadableImage, decode, describe_skipped, image_warnings, is_image_file
from cxr.data.split import walk_files
from cxr.atomic import spreadsheet_safe
from cxr.errors import UserError, warn
from cxr.progress import progress
from cxr.bundle.saved_model import SavedModel
from cxr.model.task import NONE_CALLED


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
        elif path.exists():
            raise UserError(f"{path}: not a regular file (a FIFO, socket or device); give {IMAGE_KINDS} files or "
                            "a folder")
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


@dataclass
class Predictions:
    """What `predict_files` found: the readable `files` in order, their calibrated `probabilities` (n, classes),
    `labels` (n,) (multi-label: (n, findings) 0/1), `warnings` (n lists of sentences: why an image may not be the
    X-ray the model expects, as the server says them), the population `check` (None for a model without one),
    and the `skipped` files: {path: why it could not be used}."""
    files: list
    probabilities: np.ndarray
    labels: np.ndarray
    warnings: list
    check: object
    skipped: dict


def decode_with_warnings(path, size):
    """(the `DecodedImage`, None, [warnings]) for a readable image, (None, why not, []) otherwise."""
    try:
        image = decode(path, size)
    except UnreadableImage as error:
        return None, str(error).removeprefix(f"{path}: "), []
    return image, None, image_warnings(image, size)


def predict_files(model, files, batch_size=64, tta=False, log=None):
    """`Predictions` for the image files `files`, saying on stderr which files were skipped, each readable image's
    warnings and how many images the population check flagged.

    `model` is a `SavedModel`. The next chunk of files is decoded in threads while the model runs on this one.
    `log`: a `monitor.log.PredictionLog` that gets a row per answer.
    """
    size = model.predictor().input_shape[1]
    chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
    raw, features, readable, warnings, skipped, images, seconds = [], [], [], [], {}, [], []
    with ThreadPoolExecutor() as pool, progress(total=len(files), desc="Predicting") as bar:
        pending = [pool.submit(decode_with_warnings, path, size) for path in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            began = time.perf_counter()
            results = [future.result() for future in pending]
            pending = ([pool.submit(decode_with_warnings, path, size) for path in chunks[k + 1]]
                       if k + 1 < len(chunks) else [])
            batch = [image.pixels for image, _, _ in results if image is not None]
            for path, (image, reason, notes) in zip(chunk, results):
                if image is None:
                    skipped[path] = reason
                else:
                    readable.append(path)
                    warnings.append(notes)
                    images.append(image)
            if batch:
                outputs, taps = model.raw_outputs(np.stack(batch), batch_size=len(batch), tta=tta)
                raw.append(outputs)
                features.append(taps)
                seconds += [(time.perf_counter() - began) / len(batch)] * len(batch)
            bar.update(len(chunk))
    if skipped:
        warn(f"skipped {len(skipped)} unreadable or refused images: {describe_skipped(skipped)}")
    for path, notes in zip(readable, warnings):
        if notes:
            warn(f"{path}: {'; '.join(notes)}")
    probabilities, labels = model.calibrate(np.concatenate(raw) if raw else np.zeros((0, len(model.class_names))))
    check = model.check_population(np.concatenate(features)) if features else None
    warn_population(check, len(readable), model.population_note)
    if log is not None:
        from cxr.monitor.log import answer_row, header_fields

        for k, path in enumerate(readable):
            log.record(answer_row(model, probabilities[k], labels[k], population_fields(check, k), images[k])
                       | header_fields(path) | {"image_key": log.key("path", str(Path(path))),
                                                "warnings": warnings[k], "latency_ms": 1000 * seconds[k]})
    return Predictions(readable, probabilities, labels, warnings, check, skipped)


def warn_population(check, n_images, unavailable):
    """Say on stderr how many images the population check flagged, or why the model has none (`unavailable`)."""
    if check is None:
        if n_images:
            warn(unavailable)
    elif check.flagged:
        warn(f"{check.flagged} of {n_images} images are unlike the images this model was trained on (flagged: "
             "in_distribution false): their results are not reliable; they may be from another population (other "
             "ages, devices or views) or not chest X-rays")


POPULATION_FIELDS = ("in_distribution", "population_score", "population_percentile")


def population_fields(check, k):
    """Image `k`'s population check fields (`PopulationCheck.record`), all None for a model without a check."""
    return check.record(k) if check is not None else dict.fromkeys(POPULATION_FIELDS)


def format_predictions(predictions, task, fmt="table", operating_point=None):
    """One record per file of `predictions` (`Predictions`) of a model of `task` (`cxr.model.task.Task`): the
    label, its probability and every class's probability; for a multi-label model the findings called
    (`positive_findings`, joined by '|' as the label) and every finding's probability. Each also carries the
    population check ("in_distribution", its score and percentile; None without one), the image's warnings (csv:
    joined by '; ') and the rule that made the label from the probabilities (`operating_point`: the model's;
    "threshold" and "rule", per finding for multi-label; the table says it once, above the rows)."""
    from cxr.bundle.model_card import decision_rule

    point = operating_point or task.default_point()
    names, per_finding = task.class_names, task.multi_label
    rules = ("each finding is called when its calibrated probability reaches its threshold" if per_finding else
             decision_rule(point, names))
    thresholds = dict(zip(names, task.thresholds(point))) if per_finding else point.get("threshold")
    check, records = predictions.check, []
    for k, (p, prob, label, notes) in enumerate(zip(predictions.files, predictions.probabilities, predictions.labels,
                                                    predictions.warnings)):
        record = {"path": str(p), "label": task.label_text(label, prob)}
        record |= ({"positive_findings": task.called(label, prob)} if per_finding else
                   {"probability": float(prob[label])})
        records.append(record | population_fields(check, k) | {"warnings": notes}
                       | {f"p_{name}": float(prob[i]) for i, name in enumerate(names)}
                       | {("thresholds" if per_finding else "threshold"): thresholds, "rule": rules})
    columns = ["path", "label", *([] if per_finding else ["probability", "threshold"]), *POPULATION_FIELDS,
               "warnings", "rule"]
    if fmt == "json":
        return json.dumps(records, indent=2)
    threshold_columns = {f"threshold_{n}": t for n, t in thresholds.items()} if per_finding else {}
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*columns, *(f"p_{n}" for n in names), *threshold_columns],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe("; ".join(v) if k == "warnings" else v) for k, v in r.items()}
                         | threshold_columns for r in records)
        return buffer.getvalue().rstrip("\n")
    width = max([len(r["path"]) for r in records] + [4])

    def population(r):
        return {None: "n/a", True: "ok", False: "FLAGGED: unlike its training images"}[r["in_distribution"]]

    if per_finding:
        lines = [f"Rule: {rules} (" + ", ".join(f"{f} {t:.3f}" for f, t in thresholds.items()) + ")",
                 f"{'path':{width}}  {'population':10}  findings called (calibrated probability)"]
        lines += [f"{r['path']:{width}}  {population(r)[:10]:10}  " + (", ".join(
            f"{f} {r[f'p_{f}']:.3f}" for f in r["positive_findings"]) or r["label"]) for r in records]
        return "\n".join(lines)
    lines = [f"Rule: {rules}", f"{'path':{width}}  {'label':12}  probability  population"]
    lines += [f"{r['path']:{width}}  {r['label']:12}  {r['probability']:.4f}       {population(r)}" for r in records]
    return "\n".join(lines)


@dataclass(frozen=True)
class PredictOptions:
    batch_size: int = 64
    tta: bool = False  # average with the mirror image
    skipped_list: Path = None  # a CSV file to write every skipped file and the reason into
    precision: str = "auto"  # as `SavedModel.load`'s
    monitor_db: str = None  # the prediction log (`cxr.monitor.log`) to record every answer in


def run_predict(paths, model_path, fmt="table", options=PredictOptions()):
    """The predictions for the images `paths` name, formatted. UserError when no image could be predicted."""
    files = list_inputs(paths)
    model = SavedModel.load(model_path, options.precision)
    skipped_list = options.skipped_list
    log = None
    if options.monitor_db is not None:
        from cxr.monitor.log import PredictionLog

        log = PredictionLog(options.monitor_db, "predict", wait=True)  # a folder of 50,000 keeps every row
    model.predictor()  # LiteRT whenever it can run the model: the conversion is cached for the next call
    try:
        predictions = predict_files(model, files, options.batch_size, options.tta, log)
    finally:
        if log is not None:
            log.close()
    if skipped_list is not None:
        write_skipped(skipped_list, predictions.skipped)
    if not predictions.files:
        more = f" (every one listed in {skipped_list})" if skipped_list else "; --skipped-list FILE lists them all"
        raise UserError(f"none of the {len(files)} images could be predicted: {describe_skipped(predictions.skipped)}"
                        f"{more}")
    return format_predictions(predictions, model.task, fmt, model.operating_point)


def write_skipped(path, skipped):
    """A CSV of every skipped file and why (`skipped`: {path: reason})."""
    from cxr.bundle.artifacts import write_csv

    try:
        write_csv([("path", "reason"), *((str(p), reason) for p, reason in skipped.items())], Path(path))
    except OSError as error:
        raise UserError(f"--skipped-list {path}: can't write it ({error.strerror}); choose another file") from None


def explained_classes(model, probability, label, class_name=None):
    """Class indices to map for one image: `class_name`; else what `Task.explained` says (the predicted class, or
    the findings called, most probable first)."""
    if class_name is not None:
        return [model.class_names.index(class_name)]
    return model.task.explained(label, probability)


def population_notice(check, k):
    """The line a figure's title adds for image `k` of a population check (`check`; None: the model has none)."""
    if check is None:
        return "\npopulation check unavailable for this model"
    if check.in_distribution[k]:
        return ""
    share = ("every validation image's" if check.percentiles[k] >= 100
             else f"{check.percentiles[k]:.0f}% of validation images")
    return f"\nFLAGGED: unlike the training images, not reliable\n(population score above {share})"


def run_explain(paths, model_path, output_dir, class_name=None, tta=False):
    """Write one Grad-CAM overlay PNG per image into `output_dir` (a multi-label model: a panel per explained
    finding); returns the written paths."""
    from cxr.atomic import write_bytes
    from cxr.data.decode import decode_image
    from cxr.evaluate import gradcam, plots

    files = list_inputs(paths)
    model = SavedModel.load(model_path)
    class_names = model.class_names
    if class_name is not None and class_name not in class_names:
        raise UserError(f"--class {class_name!r} is not one of the model's classes ({', '.join(class_names)})")
    model.predictor(n_images=len(files) * (2 if tta else 1))
    predictions = predict_files(model, files, tta=tta)
    readable, probabilities, labels, check = (predictions.files, predictions.probabilities, predictions.labels,
                                              predictions.check)
    size = model.keras_model.input_shape[1]
    written = []
    names = overlay_names(readable)
    for k, (path, prob, label) in enumerate(zip(readable, probabilities, labels)):
        targets = explained_classes(model, prob, label, class_name)
        maps = gradcam.heatmaps(model.keras_model, np.repeat(decode_image(path, size)[None], len(targets), 0), targets)
        shown = decode_image(path, max(size, 512))  # overlay on a sharper copy than the model's input
        if model.multi_label:
            title = f"{path.name}\nfindings called: {', '.join(model.task.called(label, prob)) or NONE_CALLED}"
            thresholds = model.task.thresholds(model.operating_point)
            panels = [(gradcam.overlay(shown, m), f"map for {class_names[t]} (p = {prob[t]:.3f}, threshold "
                                                  f"{thresholds[t]:.3f})")
                      for t, m in zip(targets, maps)]
        else:
            title = f"{path.name}\npredicted {class_names[label]} (p = {prob[label]:.3f})"
            if targets[0] != label:
                title += f"; map for {class_names[targets[0]]}"
            panels = [(gradcam.overlay(shown, maps[0]), "")]
        title += population_notice(check, k)
        out = Path(output_dir) / names[path]
        write_bytes(out, plots.figure_png(plots.explanation_figure(panels, title)))
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
