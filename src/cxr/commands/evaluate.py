"""`cxr evaluate`: a saved model on labelled images it was not trained on (a folder of class folders, a split of a
training run's splits.csv, or a labels CSV), with the reports and plots training writes for its test split."""

import os
import time
from pathlib import Path

from cxr.atomic import write_json
from cxr.errors import warn


def evaluate(model_path, output_dir, options, data_dir=None, splits=None, labels=None, precision="auto"):
    """Evaluate the saved model at `model_path` without retraining, on `data_dir`/<Class>/ (or its test/
    subfolder), on one split of a training run's splits.csv (`splits`: (csv path, split name)) or on a labels
    CSV (`labels`: (csv path, images folder, `data.labels_csv.LabelOptions`)); writes reports and plots under
    `output_dir` and returns the summary dict.

    `options` is an `evaluate.EvaluationOptions`; `precision` as `SavedModel.load`'s.
    """
    from cxr.bundle.artifacts import Outputs, refuse_training_run
    from cxr.data.split import read_labelled_folder, read_splits_csv
    from cxr.bundle.saved_model import SavedModel
    from cxr.model.inference import describe_fitted_on

    started = time.perf_counter()
    model = SavedModel.load(model_path, precision)
    if splits is None:  # a run's splits.csv serves either kind
        model.require_data(labels is not None, "evaluate")
    if labels is not None:
        from cxr.data.labels_csv import read_evaluation_table

        dataset = read_evaluation_table(labels[0], labels[1], labels[2], model.class_names)
        folder = Path(labels[1])
        source = f"{labels[0]} (images in {labels[1]})"
    elif splits is not None:
        dataset = read_splits_csv(splits[0], model.class_names, splits[1])
        folder = Path(os.path.commonpath([p.resolve().parent for p in dataset.paths]))
        source = f"the {splits[1]} split listed in {splits[0]}"
    else:
        folder = Path(data_dir) / "test" if (Path(data_dir) / "test").is_dir() else Path(data_dir)
        dataset = read_labelled_folder(folder, model.class_names)
        source = str(folder)
    outputs = Outputs(output_dir)
    refuse_training_run(outputs)
    outputs.prepare(training=False)
    import keras

    keras.utils.set_random_seed(options.seed)  # the bootstrap's and the shortcut check's draws
    from cxr.bundle.artifacts import summary, write_evaluation, write_predictions
    from cxr.evaluate import evaluate_model
    from cxr.evaluate.report import ReportContext

    dataset.decode(model.keras_model.input_shape[1], outputs.cache)
    rows = dataset.splits["evaluated"]
    model.predictor(n_images=len(rows) * (2 if options.tta else 1))
    evaluation = evaluate_model(model, dataset, "evaluated", options)
    settings = {"model": str(model_path), "data_dir": str(folder), "tta": options.tta,
                "bootstrap": options.bootstrap, "seed": options.seed}
    if splits is not None:
        settings |= {"splits": str(splits[0]), "split": splits[1]}
    if labels is not None:
        settings |= {"labels": str(labels[0]), "images": str(labels[1])}
    note = ""
    seen = seen_in_training(model, dataset.paths)
    if seen:
        warn(f"{seen} of {len(dataset.paths)} images were used to train or validate this model (its run's "
             "reports/splits.csv lists them): these numbers are optimistic; evaluate on its test split or on other "
             "images")
    if model.is_other_data(folder):
        note = (f"The operating point (temperature and threshold) was fitted on "
                f"{describe_fitted_on(model.operating_point)}, not on these images: at another site or on other "
                "data it may not hold. To refit it on a labelled sample of this site: cxr calibrate --model "
                f"{model_path} --data-dir SITE_SAMPLE --output-dir DIR")
        warn(note)
    context = ReportContext("cxr: evaluation of a saved model",
                            f"{model_path} on {source} ({len(rows)} images){', with flip TTA' if options.tta else ''}.",
                            dataset.counts(), settings, note=note, data=source,
                            about={"model_sha256": model.sha256, "seconds": time.perf_counter() - started})
    write_evaluation(outputs, evaluation, context)
    write_predictions(outputs.reports / "predictions.csv", evaluation, dataset.files("evaluated"),
                      dataset.split("evaluated")[1])
    result = summary(evaluation, context, inference=model.engine)
    write_json(outputs.reports / "summary.json", result)
    return result


def seen_in_training(model, paths):
    """How many of `paths` the model's training run used for training or validation, by its reports/splits.csv
    (beside models/, where training wrote it); 0 when that file isn't there."""
    import csv

    from cxr.data.split import from_spreadsheet_safe

    splits = model.path.parent.parent / "reports" / "splits.csv"
    try:
        with splits.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            used = {str(Path(from_spreadsheet_safe(r["path"])).resolve()) for r in csv.DictReader(f)
                    if r.get("split") in ("train", "val")}
    except (OSError, KeyError, csv.Error):
        return 0
    return sum(str(Path(p).resolve()) in used for p in paths)
