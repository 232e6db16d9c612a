"""The `cxr` command (and `train_cnn.py`): train, evaluate, predict, explain.

`train_command` is one run read top to bottom: config -> split -> pipeline -> model -> train -> evaluate ->
artifacts. TensorFlow is imported only once a command needs it, so option and data errors answer at once.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from cxr.atomic import write_json
from cxr.config import BACKBONES, Config
from cxr.errors import UserError, list_paths, warn


def setup_runtime(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpu = bool(tf.config.list_physical_devices("GPU"))
    policy = ("mixed_float16" if gpu else "mixed_bfloat16") if config.mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)


def train_command(config):
    """Train, evaluate on the test split and write every artifact; returns the summary dict."""
    from cxr.artifacts import Outputs
    from cxr.data.split import describe, prepare_splits

    started = time.perf_counter()
    config.validate()
    outputs = Outputs(config.output_dir).prepare()
    splits = prepare_splits(config)
    print(describe(splits), flush=True)
    from cxr.evaluate.metrics import fit_operating_point
    from cxr.inference import positive_class

    positive = positive_class(splits.class_names, config.positive_class)

    setup_runtime(config)
    import keras

    from cxr import artifacts, models, train
    from cxr.data.pipeline import decode_splits
    from cxr.evaluate import evaluate_model, plots
    from cxr.inference import predict_probabilities
    from cxr.litert import fast_inference

    images, data, paths = decode_splits(splits, config.img_size, outputs.cache, strict=config.strict)
    class_names = splits.class_names
    counts = {split: {name: int((data[split][1] == i).sum()) for i, name in enumerate(class_names)}
              for split in ("train", "val", "test")}

    model = models.build_classifier(config.backbone, len(class_names), config.weights, config.img_size, config.dropout)
    frozen_layers = (config.frozen_layers if config.frozen_layers is not None
                     else models.DEFAULT_FROZEN_LAYERS[config.backbone])
    models.check_frozen_layers(model, frozen_layers)

    server = train.start_tensorboard(outputs.logs, config.port) if config.port else None
    try:
        result = train.train(model, images, data, len(class_names), config, frozen_layers, outputs.staging,
                             outputs.logs)
    finally:
        if server is not None:
            server.terminate()

    print("Fitting the calibration and the operating point on validation; evaluating on test", flush=True)
    val_rows, y_val = data["val"]
    test_rows, y_test = data["test"]
    predictor, engine = fast_inference(model, n_images=len(val_rows) + len(test_rows))
    point = fit_operating_point(y_val, predict_probabilities(predictor, images, val_rows, config.batch_size),
                                class_names, positive, config.target_sensitivity)
    evaluation = evaluate_model(model, images, test_rows, y_test, class_names, point, config.bootstrap, config.seed,
                                names=[paths[r].name for r in test_rows], batch_size=config.batch_size,
                                predictor=predictor)

    artifacts.save_model(model, outputs.models / "model.h5")
    artifacts.publish_staged(outputs)
    artifacts.write_model_info(outputs.models, class_names, img_size=config.img_size, backbone=config.backbone,
                               **point)
    result.seconds["total_seconds"] = time.perf_counter() - started
    artifacts.write_evaluation(
        outputs, evaluation, "cxr: test-set evaluation",
        f"{config.backbone} trained on {config.data_dir}; evaluated on its held-out test split.",
        counts, point, config.to_dict(),
        extra_figures={"training_curves": plots.figure_png(plots.training_curves_figure(result.history))})
    artifacts.write_splits(outputs.reports / "splits.csv", class_names, paths, data)
    summary = artifacts.summary(class_names, counts, evaluation, point, config.to_dict(),
                                timings={k: round(v, 2) for k, v in result.seconds.items()},
                                final_phase=result.final_phase, history=result.history,
                                precision=keras.mixed_precision.global_policy().name, inference=engine)
    write_json(outputs.reports / "summary.json", summary)
    print_headline(evaluation, point)
    print(f"Outputs in {outputs.root}/ (models/model.h5, reports/report.html, reports/summary.json, plots/)")
    return summary


def evaluate_command(args):
    """Evaluate a saved model on a folder of class subfolders (or its test/ subfolder) without retraining."""
    from cxr.artifacts import Outputs, read_model_info, saved_operating_point, summary, write_evaluation
    from cxr.data.pipeline import decode_all
    from cxr.data.split import list_class_folders, list_images
    from cxr.predict import load_model

    info = read_model_info(args.model)
    class_names = info["class_names"]
    folder = args.data_dir / "test" if (args.data_dir / "test").is_dir() else args.data_dir
    found = list_class_folders(folder)
    unknown = [c for c in found if c not in class_names]
    if unknown:
        raise UserError(f"{folder}: class folders {', '.join(unknown)} are not classes of the model "
                        f"({', '.join(class_names)}); rename the folders to the model's class names")
    missing = [c for c in class_names if c not in found]
    if missing:
        warn(f"{folder}: no folder for class {', '.join(missing)}; metrics that need it are reported as null")
    files = list_images(folder, found)
    paths = [p for c in found for p in files[c]]
    if not paths:
        raise UserError(f"{folder}: no images in its class folders; add .jpg, .jpeg, .png or .bmp files")
    labels = [class_names.index(c) for c in found for _ in files[c]]

    outputs = Outputs(args.output_dir).prepare(training=False)
    setup_runtime(Config(seed=args.seed))
    from cxr.evaluate import evaluate_model
    from cxr.litert import fast_inference

    model = load_model(args.model)
    images, bad = decode_all(paths, model.input_shape[1], outputs.cache)
    if bad:
        warn(f"skipped {len(bad)} unreadable images: {list_paths(bad)}")
    rows = np.flatnonzero([p not in set(bad) for p in paths])
    if not len(rows):
        raise UserError(f"{folder}: none of its images could be read; check the image files")
    y = np.array(labels)[rows]
    point = saved_operating_point(info)
    predictor, engine = fast_inference(model, args.model, n_images=len(rows) * (2 if args.tta else 1))
    evaluation = evaluate_model(model, images, rows, y, class_names, point, args.bootstrap, args.seed, args.tta,
                                names=[paths[r].name for r in rows], batch_size=args.batch_size, predictor=predictor)
    counts = {"evaluated": {name: int((y == i).sum()) for i, name in enumerate(class_names)}}
    settings = {"model": str(args.model), "data_dir": str(folder), "tta": args.tta, "bootstrap": args.bootstrap,
                "seed": args.seed}
    write_evaluation(outputs, evaluation, "cxr: evaluation of a saved model",
                     f"{args.model} on {folder} ({len(rows)} images){', with flip TTA' if args.tta else ''}.",
                     counts, point, settings)
    write_json(outputs.reports / "summary.json",
               summary(class_names, counts, evaluation, point, settings, inference=engine))
    print_headline(evaluation, point)
    print(f"Outputs in {outputs.root}/ (reports/report.html, reports/metrics.csv, reports/summary.json, plots/)")


def print_headline(evaluation, point):
    m, ci = evaluation.metrics, evaluation.confidence_intervals

    def show(name):
        value, interval = m.get(name), ci.get(name)
        if value is None:
            return f"{name} n/a"
        return f"{name} {value:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval and interval[0] is not None else "")

    names = (["sensitivity", "specificity", "auc_roc"] if "sensitivity" in m else
             ["macro sensitivity", "macro specificity", "macro auc_roc"]) + ["accuracy", "balanced_accuracy"]
    where = f" at threshold {point['threshold']:.3f} for {point['positive_class']}" if point["threshold"] is not None else ""
    print(f"Test{where}: " + ", ".join(show(n) for n in names))


def _add_train_options(parser):
    d = Config()
    add = parser.add_argument
    add("--data-dir", type=Path, default=d.data_dir, help="folder with train/<Class>/ (+ val/, test/) or raw/<Class>/")
    add("--output-dir", type=Path, default=d.output_dir, help="where models/, reports/, plots/ and logs/ go")
    add("--img-size", type=int, default=d.img_size, help="square input size in pixels")
    add("--batch-size", type=int, default=d.batch_size)
    add("--epochs", type=int, default=d.epochs, help="maximum epochs per phase")
    add("--val-split", type=float, default=d.val_split, help="validation fraction per class when splitting")
    add("--test-split", type=float, default=d.test_split, help="test fraction per class when splitting")
    add("--patience", type=int, default=d.patience, help="EarlyStopping patience (epochs)")
    add("--seed", type=int, default=d.seed)
    add("--lr", type=float, default=d.lr, help="phase 1 (head) learning rate")
    add("--finetune-lr", type=float, default=d.finetune_lr, help="phase 2 (fine-tuning) learning rate")
    add("--frozen-layers", type=int, default=d.frozen_layers,
        help="backbone layers kept frozen in phase 2 (default: 200 for B0, the same blocks, 132 layers, for Lite0)")
    add("--dropout", type=float, default=d.dropout)
    add("--backbone", choices=BACKBONES, default=d.backbone)
    add("--weights", default=d.weights, help="imagenet, none, or the path to a backbone weights file")
    add("--port", type=int, default=d.port, help="serve TensorBoard on this port while training")
    add("--mixed-precision", action=argparse.BooleanOptionalAction, default=d.mixed_precision,
        help="bfloat16 on CPU, float16 on GPU, float32 outputs (default: off; slower on the CPUs measured)")
    add("--class-weight", choices=("none", "balanced"), default=d.class_weight)
    add("--deterministic", action="store_true", help="deterministic TensorFlow ops: same numbers run to run")
    add("--strict", action="store_true", help="fail on unreadable or non-image files instead of skipping them")
    add("--val-from-train", action=argparse.BooleanOptionalAction, default=d.val_from_train,
        help="carve validation from train (default: when val/ has fewer than 50 images)")
    add("--group-pattern", default=d.group_pattern,
        help="regex whose first group is the patient id in a file name (default: Kermany naming)")
    add("--feature-cache", action=argparse.BooleanOptionalAction, default=d.feature_cache,
        help="phase 1 on backbone features computed once (default); --no-feature-cache runs plain Keras")
    add("--feature-views", type=int, default=d.feature_views, help="augmented views per image in the feature cache")
    add("--positive-class", default=d.positive_class,
        help="class the threshold and sensitivity refer to (default: PNEUMONIA if present, else the second class)")
    add("--target-sensitivity", type=float, default=d.target_sensitivity,
        help="pick the highest threshold reaching this sensitivity on validation (default: maximise Youden's J)")
    add("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples for the confidence intervals")


def build_parser():
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray classifiers by transfer learning.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train, evaluate and write outputs/")
    _add_train_options(train)
    predict = commands.add_parser("predict", help="classify images with a saved model")
    predict.add_argument("paths", nargs="+", help="image files or folders of images")
    predict.add_argument("--model", default="outputs/models/model.h5")
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")

    evaluate = commands.add_parser("evaluate", help="evaluate a saved model on a folder of class subfolders")
    evaluate.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"))
    evaluate.add_argument("--data-dir", type=Path, required=True,
                          help="folder of <Class>/ subfolders (or with a test/ subfolder of them)")
    evaluate.add_argument("--output-dir", type=Path, default=Path("outputs/evaluation"))
    evaluate.add_argument("--bootstrap", type=int, default=2000, help="resamples for the confidence intervals")
    evaluate.add_argument("--seed", type=int, default=42)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")

    explain = commands.add_parser("explain", help="Grad-CAM overlays showing where the model looked")
    explain.add_argument("paths", nargs="+", help="image files or folders of images")
    explain.add_argument("--model", default="outputs/models/model.h5")
    explain.add_argument("--output-dir", type=Path, default=Path("outputs/explain"))
    explain.add_argument("--class", dest="class_name", help="class to explain (default: the predicted one)")
    explain.add_argument("--tta", action="store_true", help="predict with flip TTA (the map is of the image as is)")
    return parser


def config_from_args(args):
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train_command(config_from_args(args))
        elif args.command == "predict":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # predict imports TensorFlow only to convert
            from cxr.predict import run_predict

            print(run_predict(args.paths, args.model, args.format, args.batch_size, args.tta))
        elif args.command == "evaluate":
            evaluate_command(args)
        elif args.command == "explain":
            setup_runtime(Config())
            from cxr.predict import run_explain

            for path in run_explain(args.paths, args.model, args.output_dir, args.class_name, args.tta):
                print(path)
    except UserError as error:
        print(f"cxr: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr: interrupted; finished outputs are intact, unfinished ones were not written", file=sys.stderr)
        return 130
    return 0
