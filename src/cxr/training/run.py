"""A training run read top to bottom: the library API behind `cxr train`.

    summary = cxr.training.run.train(Config(data_dir=..., backbone="efficientnet-lite0"))

`train` is config -> split -> decode -> model -> train -> operating point -> evaluate -> artifacts.
TensorFlow is imported only once a step needs it, so option and data errors answer at once.
"""

import contextlib
import os
import shutil
import time
from pathlib import Path

from cxr.atomic import write_json
from cxr.errors import UserError, warn

SPLIT_WAIT_SECONDS = 600  # how long a multi-worker job's other workers wait for the chief to split raw/
FIT_IMAGES = 1000  # training images the population check's Gaussians are fitted on


def setup_runtime(config, strategy="none"):
    """The tf.distribute strategy, seeds, determinism and the dtype policy, before any model is built; returns
    the `distribute.Distribution`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from cxr.training import distribute

    distributed = distribute.make_strategy(strategy)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpu = bool(tf.config.list_physical_devices("GPU"))
    policy = ("mixed_float16" if gpu else "mixed_bfloat16") if config.mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return distributed


def check_codes(class_names, own, path):
    """The site's codes (`own`, from --codes `path`) of these classes; a warning for each class without a standard
    code and for each row of the file that names no class."""
    from cxr.data import vocabulary

    matched, strangers = vocabulary.site_codes(class_names, own)
    if strangers:
        warn(f"--codes {path}: {', '.join(strangers)} {'is' if len(strangers) == 1 else 'are'} not a class of this "
             f"model ({', '.join(class_names)}); {'that row is' if len(strangers) == 1 else 'those rows are'} unused")
    missing = vocabulary.uncoded_warning(class_names, matched)
    if missing:
        warn(missing)
    return matched


def train(config):
    """Train, evaluate on the test split and write every artifact; returns the summary dict.

    In a multi-worker job (`--strategy multiworker`) every worker calls this; the chief returns the summary,
    the others train in step with it in a temporary folder, remove it and return None.
    """
    from cxr.training import distribute

    config.validate()
    data_dir, output_dir = Path(config.data_dir).resolve(), Path(config.output_dir).resolve()
    if any(output_dir == data_dir / layout or data_dir / layout in output_dir.parents for layout in ("train", "raw")):
        raise UserError(f"--output-dir {config.output_dir} is inside the data's {output_dir.relative_to(data_dir).parts[0]}/"
                        " folder, where its files would be taken for images; choose a folder outside it")
    if config.strategy != "multiworker" or distribute.cluster_role()[2]:
        return _train(config, config.output_dir, chief=True)
    from cxr.bundle.artifacts import worker_folder

    worker_dir = worker_folder()
    try:
        _train(config, worker_dir, chief=False)
    finally:
        shutil.rmtree(worker_dir, ignore_errors=True)
    return None


def _train(config, output_dir, chief):
    """`train`, writing into `output_dir`: --output-dir on the chief, a worker's own temporary folder elsewhere
    (where the decode cache and frozen-layer outputs are computed again: no storage need be shared)."""
    from cxr.bundle.artifacts import Outputs
    from cxr.data import vocabulary
    from cxr.data.split import describe, prepare_splits
    from cxr.model.inference import positive_class

    started = time.perf_counter()
    own_codes = vocabulary.read_codes(config.codes) if config.codes is not None else {}
    outputs = Outputs(output_dir).prepare(resume=config.resume)
    if config.multi_label:
        from cxr.data.labels_csv import read_labelled_table

        dataset = read_labelled_table(config.labels, config.images, config.label_options(), config, config.test_list)
        positive = None
    else:
        dataset = prepare_splits(config, split_wait=None if chief else SPLIT_WAIT_SECONDS)
        positive = positive_class(dataset.class_names, config.positive_class)
    print(describe(dataset), flush=True)
    own_codes = check_codes(dataset.class_names, own_codes, config.codes) if chief else {}

    distribution = setup_runtime(config, config.strategy)
    import keras

    from cxr.bundle import artifacts, precision, serving

    from cxr.model import networks

    from cxr.training import resume
    from cxr.data.pipeline import cache_key
    from cxr.evaluate import EvaluationOptions, evaluate_model, plots
    from cxr.evaluate.report import ReportContext
    from cxr.bundle.saved_model import SavedModel
    from cxr.monitor.reference import Reference
    from cxr.training.loop import TrainingRun, default_phases, train as train_phases

    fingerprint = resume.fingerprint(config, cache_key(dataset.paths, config.img_size))
    # every worker restores the chief's state: a resumed multi-worker job needs --output-dir on shared storage
    state = resume.RunState.load(Outputs(config.output_dir).staging, fingerprint) if config.resume else None
    dataset.decode(config.img_size, outputs.cache, strict=config.strict)
    class_names = dataset.class_names
    builder = networks.Builder(distribution.strategy, weight_decay=config.weight_decay, label_smoothing=config.label_smoothing,
                             multi_label=dataset.multi_label, positive_weights=positive_weights(dataset, config))
    model = builder.classifier(config.backbone, len(class_names), config.weights, config.img_size, config.dropout)
    if config.init_from is not None:
        with builder.scope():
            copied = networks.init_from(model, config.init_from)
        print(f"Backbone initialised from {config.init_from} ({copied} layers); the head starts anew", flush=True)
    frozen_layers = (config.frozen_layers if config.frozen_layers is not None
                     else networks.default_frozen_layers(model, config.backbone))
    networks.check_frozen_layers(model, frozen_layers)

    run = TrainingRun(builder, default_phases(config, frozen_layers), frozen_layers, outputs.staging, outputs.logs,
                      resume=state, fingerprint=fingerprint)
    with tensorboard(outputs.logs, config.port if chief else None):
        result = train_phases(model, dataset, config, run)
    if not chief:
        print(f"{distribution.task}: training done; the chief writes the model and reports", flush=True)
        return None

    scales = config.test_time_scales
    model = networks.with_test_time_scales(model, scales)
    views = f" (each image as the mean of {len(scales)} zoomed views)" if networks.has_test_time_scales(model) else ""
    print(f"Fitting the calibration and the operating point on validation; evaluating on test{views}", flush=True)
    classifier = SavedModel.from_keras(model, class_names, config.img_size, config.backbone, scales,
                                       multi_label=dataset.multi_label)
    classifier.codes = own_codes
    classifier.predictor(n_images=images_to_serve(dataset, config))
    fit_point = precision.default_point_fitter(classifier.task, positive, config.target_sensitivity)
    # int8 is guarded as it would be served, at its own operating point; then fit and evaluate what is served
    serving.choose(classifier, dataset, config.precision, config.seed, fit_point)
    val_rows, val_y = dataset.split("val")
    # computed once: what the operating point and the population check are fitted on, and the monitor's reference
    val_outputs = classifier.raw_outputs(dataset.images, val_rows, config.batch_size)
    classifier.operating_point, (classifier.population, unavailable) = fit_on_validation(
        classifier, dataset, fit_point, config, val_outputs)
    classifier.population_note = unavailable or classifier.population_note
    evaluation = evaluate_model(classifier, dataset, "test",
                                EvaluationOptions(config.bootstrap, config.seed, batch_size=config.batch_size,
                                                  subgroups=tuple(config.subgroups or ()), age_bands=config.age_bands))

    artifacts.publish_model(classifier, outputs)
    # what cxr monitor compares with
    Reference.of_outputs(classifier, *val_outputs, val_y, dataset.files("val")).save(outputs.models)
    result.seconds["total_seconds"] = time.perf_counter() - started
    context = ReportContext(
        "cxr: test-set evaluation", f"{config.backbone} trained on {data_source(config)}; evaluated on its held-out "
        "test split.", dataset.counts(), config.to_dict(),
        {"training_curves": plots.figure_png(plots.training_curves_figure(result.history))},
        data="its held-out test split", defaults=type(config)().to_dict(),
        about={"model_sha256": classifier.sha256, "seconds": result.seconds["total_seconds"]})
    artifacts.write_evaluation(outputs, evaluation, context)
    artifacts.write_splits(outputs.reports / "splits.csv", dataset)
    summary = artifacts.summary(evaluation, context, timings={k: round(v, 2) for k, v in result.seconds.items()},
                                final_phase=result.final_phase, history=result.history,
                                precision=keras.mixed_precision.global_policy().name, inference=classifier.engine,
                                inference_choice=classifier.inference,
                                strategy=distribution.record())
    write_json(outputs.reports / "summary.json", summary)
    return summary


def data_source(config):
    """The run's data in words: the data folder, or the labels CSV and its images folder."""
    return f"{config.labels} (images in {config.images})" if config.multi_label else str(config.data_dir)


def positive_weights(dataset, config):
    """(findings,) negatives / positives per finding on the training split, for a multi-label run with
    --class-weight balanced; None otherwise."""
    if not dataset.multi_label or config.class_weight != "balanced":
        return None
    import numpy as np

    labels = dataset.labels[dataset.splits["train"]]
    positives, negatives = np.sum(labels == 1, axis=0), np.sum(labels == 0, axis=0)
    return [float(w) for w in np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)]


def images_to_serve(dataset, config):
    """How many images the trained model will see before training ends, for `SavedModel.predictor` to judge
    whether its LiteRT conversion pays (`litert.MIN_IMAGES_TO_CONVERT`): the validation and test splits and the
    population check's sample of the training split where it is fitted; None (convert) where int8 is to be
    converted, since int8 runs on LiteRT."""
    from cxr.bundle import precision

    val, test, train = (len(dataset.splits[s]) for s in ("val", "test", "train"))
    if precision.converts_int8(config.precision, val):
        return None
    fitted = population_unavailable(config, val) is None
    return val + test + (min(FIT_IMAGES, train) if fitted else 0)


def population_unavailable(config, n_val):
    """Why the population check is not fitted for a run of `n_val` validation images (None: it is)."""
    from cxr.model import population

    return population.too_few_validation_images(n_val) if config.population_check == "auto" else None


def fit_population(model, dataset, config, val_features):
    """The population check (`cxr.model.population`): Gaussians fitted on a seeded sample of FIT_IMAGES training
    images, flagging `config.false_flag_rate` of the validation split (`val_features`: its features), as
    (check, None); (None, why) where the validation split is too small for a check worth its flags."""
    import numpy as np

    from cxr.model import population

    reason = population_unavailable(config, len(val_features))
    if reason is not None:
        warn(reason)
        return None, reason
    train_rows = dataset.splits["train"]
    sample = np.sort(np.random.default_rng(config.seed).choice(train_rows, min(FIT_IMAGES, len(train_rows)),
                                                               replace=False))
    _, train_features = model.raw_outputs(dataset.images, sample, config.batch_size)
    taps, dims = model.population_layers()
    return population.fit(train_features, val_features, taps, dims, config.false_flag_rate), None


def fit_on_validation(model, dataset, fit_point, config, outputs=None):
    """(the operating point: temperature and threshold, per finding for a multi-label model, and where it came
    from; (the population check, or None and why there is none)) fitted on the validation split. `fit_point(y,
    raw)`: how the point is fitted; `outputs`: the model's (raw outputs, features) of the validation split, if
    already computed."""
    from cxr.model.inference import fitted_on

    rows, y = dataset.split("val")
    raw, features = outputs if outputs is not None else model.raw_outputs(dataset.images, rows, config.batch_size)
    point = fit_point(y, raw)
    # The run's own data: the folders its splits came from (train/ alone when val and test were carved from it)
    folders = [os.path.commonpath([p.resolve().parent for p in dataset.files(split)]) for split in dataset.splits]
    where = config.images if dataset.multi_label else config.data_dir
    point |= {"fitted_on": fitted_on(f"the validation split of {data_source(config)}", where,
                                     {"val": dataset.counts()["val"]}, same_data=folders)}
    return point, fit_population(model, dataset, config, features)


@contextlib.contextmanager
def tensorboard(log_dir, port):
    """TensorBoard on `port` while the block runs (nothing without a port)."""
    from cxr.training.loop import start_tensorboard

    server = start_tensorboard(log_dir, port) if port else None
    try:
        yield
    finally:
        if server is not None:
            server.terminate()
