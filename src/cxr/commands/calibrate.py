"""`cxr calibrate`: refit a saved model's temperature and threshold on a labelled sample of the user's own site.

A model's operating point is fitted on its training data's validation split; at another site the same scores
can mean something else (other devices, population, prevalence), and a threshold that balanced sensitivity and
specificity there can call most normal images positive here. Calibrating writes a copy of the model with an
operating point fitted on the site's sample and records where it came from; the original is never touched.
"""

import time
from pathlib import Path

from cxr.errors import UserError, warn

# Below this many images of a class, the threshold moves a lot with which images happened to be sampled.
MIN_IMAGES_PER_CLASS = 20


def refit_operating_point(model, y, raw, target_sensitivity=None):
    """The operating point `model` would have if fitted on labels `y` (n,) and raw softmax outputs `raw` (n, classes);
    for a multi-label model, per finding on an (n, findings) labels matrix (a finding without both positives
    and negatives in the sample keeps the model's point).

    Same rule as training (temperature by likelihood, then Youden's J or a sensitivity target on the
    calibrated probability), so a site's sample replaces the validation split.
    """
    from cxr.evaluate.scoring import scoring

    point = model.operating_point
    return scoring(model.task).fit_point(y, raw, point.get("positive_class"), target_sensitivity, keep=point)


def small_classes(counts):
    """Class names with fewer than MIN_IMAGES_PER_CLASS images in {class: images} (findings: positives)."""
    return [name for name, n in counts.items() if name != "images" and n < MIN_IMAGES_PER_CLASS]


def calibrate(model_path, data_dir, output_dir, options, target_sensitivity="model", labels=None):
    """Write output_dir/models/{model.h5, class_names.json} with the operating point refitted on
    `data_dir`/<Class>/ (or, for a multi-label model, the labels CSV `labels`: (csv path, images folder,
    `data.labels_csv.LabelOptions`)), and reports of that sample at the new point; returns the summary dict.

    `options` is an `evaluate.EvaluationOptions` (bootstrap resamples and seed for the intervals);
    `target_sensitivity`: a sensitivity target, None for Youden's J, "model" for the rule the model was
    trained with.
    """
    from cxr.bundle.artifacts import Outputs, refuse_training_run, summary, write_evaluation
    from cxr.atomic import write_json
    from cxr.data.split import read_labelled_folder
    from cxr.bundle.saved_model import SavedModel
    from cxr.model.inference import fitted_on

    started = time.perf_counter()
    model = SavedModel.load(model_path)
    if target_sensitivity == "model":
        target_sensitivity = model.operating_point.get("target_sensitivity")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise UserError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    outputs = Outputs(output_dir)
    if outputs.models.resolve() == model.path.parent.resolve():
        raise UserError(f"{output_dir}: this is the model's own folder; calibrate writes a copy, so choose "
                        "another --output-dir")
    model.require_data(labels is not None, "calibrate")
    if labels is not None:
        from cxr.data.labels_csv import read_evaluation_table

        dataset = read_evaluation_table(labels[0], labels[1], labels[2], model.class_names, split="calibration")
        data_dir = labels[1]
    else:
        dataset = read_labelled_folder(data_dir, model.class_names, split="calibration")
        missing = [name for name, n in dataset.counts()["calibration"].items() if n == 0]
        if missing:
            # a temperature fitted on one class only drives it to its bound: a confidently wrong copy
            raise UserError(f"{data_dir}: the sample has no images of {', '.join(missing)}; a temperature and "
                            "threshold can only be fitted on images of every class (20 or more each): add them "
                            f"as {data_dir}/<Class>/ folders")
    refuse_training_run(outputs)
    outputs.prepare(training=False)
    outputs.models.mkdir(exist_ok=True)
    import keras

    keras.utils.set_random_seed(options.seed)  # the bootstrap's and the shortcut check's draws
    from cxr.evaluate import evaluate_model
    from cxr.evaluate.report import ReportContext

    dataset.decode(model.keras_model.input_shape[1], outputs.cache)
    counts = dataset.counts()
    small = small_classes(counts["calibration"])
    if small:
        what = "positive images of" if model.multi_label else "images of"
        warn(f"{data_dir}: fewer than {MIN_IMAGES_PER_CLASS} {what} {', '.join(small)}; a threshold fitted on "
             "so few moves a lot with the sample: add images before relying on it")
    rows, y = dataset.split("calibration")
    model.predictor(n_images=len(rows))
    point = refit_operating_point(model, y, model.raw_probabilities(dataset.images, rows, options.batch_size),
                                  target_sensitivity)
    point["fitted_on"] = fitted_on(f"a calibration sample, {data_dir}", data_dir, counts)
    calibrated = model.copy_to(outputs.models, point)
    calibrated.predictor(n_images=len(rows))
    evaluation = evaluate_model(calibrated, dataset, "calibration", options)
    settings = {"model": str(model_path), "calibrated_model": str(calibrated.path), "data_dir": str(data_dir),
                "target_sensitivity": target_sensitivity, "bootstrap": options.bootstrap, "seed": options.seed}
    context = ReportContext(
        "cxr: calibration on a site's sample", f"{model_path} recalibrated on {data_dir} ({len(rows)} images). "
        "These numbers are measured on the sample the operating point was fitted on, so they are optimistic: "
        "evaluate on other images of the site with cxr evaluate.", counts, settings,
        data=f"the sample it was calibrated on, {data_dir}",
        about={"model_sha256": calibrated.sha256, "seconds": time.perf_counter() - started})
    write_evaluation(outputs, evaluation, context)
    result = summary(evaluation, context, inference=calibrated.engine)
    write_json(Path(outputs.reports) / "summary.json", result)
    return result
