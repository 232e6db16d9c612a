"""The `cxr` command (and `train_cnn.py`): train, predict.

`train_command` is one run read top to bottom: config -> split -> pipeline -> model -> train -> evaluate ->
artifacts. TensorFlow is imported only once a command needs it, so option and data errors answer at once.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from cxr.atomic import write_json
from cxr.config import BACKBONES, Config
from cxr.errors import UserError


def setup_runtime(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16")
    else:
        keras.mixed_precision.set_global_policy("float32")


def train_command(config):
    """Train, evaluate on the test split and write every artifact; returns the summary dict."""
    from cxr.artifacts import Outputs
    from cxr.data.split import describe, prepare_splits

    started = time.perf_counter()
    config.validate()
    outputs = Outputs(config.output_dir).prepare()
    splits = prepare_splits(config)
    print(describe(splits), flush=True)

    setup_runtime(config)
    from cxr import artifacts, evaluate, models, train
    from cxr.data.pipeline import decode_splits, make_dataset

    images, data = decode_splits(splits, config.img_size, outputs.cache, strict=config.strict)
    num_classes = len(splits.class_names)
    counts = {split: {name: int((labels == i).sum()) for i, name in enumerate(splits.class_names)}
              for split, (_, labels) in data.items()}

    model = models.build_classifier(config.backbone, num_classes, config.weights, config.img_size, config.dropout)
    frozen_layers = (config.frozen_layers if config.frozen_layers is not None
                     else models.DEFAULT_FROZEN_LAYERS[config.backbone])
    models.check_frozen_layers(model, frozen_layers)

    server = train.start_tensorboard(outputs.logs, config.port) if config.port else None
    try:
        result = train.train(model, images, data, num_classes, config, frozen_layers, outputs.staging, outputs.logs)
    finally:
        if server is not None:
            server.terminate()

    test_rows, y_test = data["test"]
    test_ds = make_dataset(images, test_rows, y_test, num_classes, config.batch_size)
    probabilities = evaluate.predict_probabilities(model, test_ds)
    classification = evaluate.report(y_test, probabilities, splits.class_names)
    test_metrics = evaluate.metrics(y_test, probabilities, splits.class_names, classification)

    artifacts.save_model(model, outputs.models / "model.h5")
    artifacts.publish_staged(outputs)
    artifacts.write_model_info(outputs.models, splits.class_names, img_size=config.img_size, backbone=config.backbone)
    artifacts.write_csv(evaluate.report_rows(classification),
                        outputs.reports / "classification_report.csv")
    artifacts.save_figure(evaluate.confusion_matrix_figure(y_test, probabilities, splits.class_names),
                          outputs.plots / "confusion_matrix.png")
    artifacts.save_figure(evaluate.training_curves_figure(result.history), outputs.plots / "training_curves.png")
    result.seconds["total_seconds"] = time.perf_counter() - started
    summary = artifacts.summary(splits.class_names, counts, test_metrics, result.seconds, config, result.history,
                                result.final_phase)
    write_json(outputs.reports / "summary.json", summary)

    auc = test_metrics["auc"]
    print(f"Test: accuracy {test_metrics['accuracy']:.4f}, AUC {'n/a' if auc is None else f'{auc:.4f}'}, "
          + ", ".join(f"recall {n} {v['recall']:.3f}" for n, v in test_metrics["per_class"].items()))
    print(f"Outputs in {outputs.root}/ (models/model.h5, reports/summary.json, plots/)")
    return summary


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
    add("--mixed-precision", action="store_true", help="bfloat16 on CPU, float16 on GPU (float32 outputs)")
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
            setup_runtime(Config())
            from cxr.predict import run_predict

            print(run_predict(args.paths, args.model, args.format, args.batch_size))
    except UserError as error:
        print(f"cxr: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr: interrupted; finished outputs are intact, unfinished ones were not written", file=sys.stderr)
        return 130
    return 0
