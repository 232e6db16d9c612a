"""The `cxr` command (and `train_cnn.py`): parse the options, call `cxr.training.run` or `cxr.commands.predict`, print the results.

TensorFlow is imported only once a command needs it, so option and data errors answer at once.
"""

import argparse
import dataclasses
import errno
import os
import sys
from pathlib import Path

import cxr
from cxr.model.backbones import NAMES as BACKBONES
from cxr.bundle.serving import PRECISIONS
from cxr.training.config import MONITORS, Config
from cxr.training.distribute import STRATEGIES
from cxr.data.pipeline import AUGMENTATIONS
from cxr.errors import VERBOSE_VARIABLE, UserError, quiet_libraries
from cxr.monitor.drift import Thresholds
from cxr.progress import QUIET_VARIABLE

EXPORT_FORMATS = ("savedmodel", "tflite", "tflite-int8", "onnx")
CODES_OPTION_HELP = ("codes for the DICOM results' findings, where cxr's vocabulary has none or the site prefers "
                     "its own: a CSV with the columns class, code, meaning and optionally scheme (default SCT)")
PRECISION_HELP = ("auto (default): as the model's training chose (int8 where it passed the accuracy guard; else "
                  "float32, with the second view only for uncertain images where that passed its guard); float32: "
                  "every view in float32, as trained; int8: the int8 conversion")


OPTION_HELP = {  # the options several commands share, said once
    "model": "the saved model: model.h5, with class_names.json beside it",
    "output_dir": "where the outputs go",
    "format": "how the answers are printed",
    "batch_size": "images per batch",
    "seed": "random seed (bootstrap resamples)",
    "port": "TCP port to listen on",
}


def add_monitor_db(parser):
    parser.add_argument("--monitor-db", metavar="DB",
                        help="record every answer in this prediction log for cxr monitor: a file (SQLite, created on "
                             "first use) or a database URL (postgresql://...); images are keyed by salted hashes, "
                             "never by name")


def add_precision(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)


def print_headline(summary, label="Test"):
    from cxr.model.inference import describe_fitted_on

    m, ci, point = summary["metrics"], summary["confidence_intervals"], summary["operating_point"]
    if "per_finding" in m:
        print_findings(m, ci, label)
        print(f"Operating points fitted on {describe_fitted_on(point)}")
        print_cautions(summary)
        return

    def show(name):
        value, interval = m.get(name), ci.get(name)
        if value is None:
            return f"{name} n/a"
        return f"{name} {value:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval and interval[0] is not None else "")

    names = (["sensitivity", "specificity", "auc_roc"] if "sensitivity" in m else
             ["macro sensitivity", "macro specificity", "macro auc_roc"]) + ["accuracy", "balanced_accuracy"]
    where = f" at threshold {point['threshold']:.3f} for {point['positive_class']}" if point["threshold"] is not None else ""
    print(f"{label}{where}: " + ", ".join(show(n) for n in names))
    print(f"Operating point fitted on {describe_fitted_on(point)}")
    print_cautions(summary)


def print_cautions(summary):
    """The numbers that rest on few images, said where they are printed."""
    cautions = summary.get("cautions") or []
    for caution in cautions[:5]:
        print(f"Caution: {caution}")
    if len(cautions) > 5:
        print(f"Caution: {len(cautions) - 5} more in reports/summary.json")


def print_findings(metrics, intervals, label):
    """A multi-label evaluation: the mean AUC, then one line per finding."""
    def number(value, interval=None):
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval and interval[0] is not None
                                 else "")

    with_auc = sum(v["status"] == "ok" for v in metrics["per_finding"].values())
    over = (f"{with_auc} findings" if with_auc == len(metrics["per_finding"]) else
            f"the {with_auc} of {len(metrics['per_finding'])} findings with both classes among these images")
    print(f"{label}: mean AUC {number(metrics['mean_auc'], intervals.get('mean_auc'))} over {over} "
          f"({metrics['n_images']} images)")
    width = max(len(name) for name in metrics["per_finding"])
    print(f"  {'finding':{width}}  positives  AUC                  sensitivity  specificity  threshold")
    for name, v in metrics["per_finding"].items():
        auc = number(v["auc_roc"], intervals.get(f"{name} auc_roc")) if v["status"] == "ok" else v["status"]
        print(f"  {name:{width}}  {v['n_positive']:>4}/{v['n_known']:<4}  {auc:<19}  {number(v['sensitivity']):<11}  "
              f"{number(v['specificity']):<11}  {v['threshold']:.3f}")


def count(minimum):
    """An argparse type: an integer of at least `minimum` (argparse's own one-line error, exit 2, otherwise)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def sensitivity_or_youden(text):
    """An argparse type: a sensitivity target in (0, 1], or None for 'youden' (Youden's J)."""
    if text.lower() in ("youden", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a sensitivity in (0, 1] or 'youden', got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"give a sensitivity in (0, 1] or 'youden', got {value}")
    return value


def iso_time(text):
    """An argparse type: an ISO 8601 date or time (UTC unless it says otherwise)."""
    import datetime

    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give an ISO 8601 date or time such as 2026-12-01, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def comma_list(text):
    """An argparse type: 'A,B,C' -> ['A', 'B', 'C']."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_label_options(parser, training=True):
    """How a labels CSV is read (train, evaluate, calibrate)."""
    add = parser.add_argument
    add("--labels", type=Path, help="a labels CSV (NIH, CheXpert or one column per finding) instead of class "
                                    "folders" + (": trains a multi-label model" if training else
                                                 ", for a multi-label model"))
    add("--images", type=Path, help="with --labels: the folder the CSV's image paths are relative to")
    add("--label-format", choices=("nih", "chexpert", "columns"), help="the CSV's format (default: from its header)")
    add("--uncertain", choices=("ignore", "zeros", "ones"), default="ignore",
        help="CheXpert's -1 (uncertain): ignore (unknown, out of the loss and metrics; default), zeros or ones")
    add("--views", type=comma_list, default=["PA", "AP"],
        help="views to use, comma-separated (default PA,AP: frontal); 'all' for every view")
    add("--path-column", help="columns format: the image path column (default: path, image, filename...)")
    add("--patient-column", help="columns format: the patient id column (splits never divide a patient)")
    add("--view-column", help="columns format: the view column (PA, AP, LATERAL...)")
    add("--subgroup", action="append", default=None, metavar="COLUMN", dest="subgroups",
        help="also report metrics by this column of the labels CSV (repeatable); sex, age, view and device are "
             "reported wherever the data has them")
    if training:
        add("--findings", type=comma_list,
            help="findings to learn, comma-separated (default: every finding with 5+ positives in the training split)")
        add("--test-list", type=Path, help="an official list of test images, one path per line (NIH's test_list.txt)")


def label_options(args):
    """The LabelOptions of parsed evaluate / calibrate arguments."""
    from cxr.data.labels_csv import LabelOptions

    return LabelOptions(args.label_format, None, args.uncertain, views_or_all(args.views), args.path_column,
                        args.patient_column, args.view_column, args.subgroups or ())


def age_bands(text):
    """An argparse type: '18,40,60,80' -> (18, 40, 60, 80), rising band edges."""
    try:
        edges = tuple(int(x) for x in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give rising whole ages separated by commas, got {text!r}") from None
    if not edges or list(edges) != sorted(set(edges)) or edges[0] <= 0:
        raise argparse.ArgumentTypeError(f"give rising whole ages separated by commas, got {text!r}")
    return edges


def views_or_all(views):
    return None if views and [v.lower() for v in views] == ["all"] else views


def _add_train_options(parser):
    d = Config()
    add = parser.add_argument
    add("--data-dir", type=Path, default=d.data_dir, help="folder with train/<Class>/ (+ val/, test/) or raw/<Class>/")
    _add_label_options(parser)
    add("--output-dir", type=Path, default=d.output_dir, help="where models/, reports/, plots/ and logs/ go")
    add("--codes", type=Path, metavar="CSV", default=None, help=CODES_OPTION_HELP)
    add("--img-size", type=int, default=d.img_size, help="square input size in pixels")
    add("--batch-size", type=int, default=d.batch_size)
    add("--epochs", type=int, default=d.epochs, help="maximum epochs per phase (phase 2: see --finetune-epochs)")
    add("--finetune-epochs", type=int, default=None,
        help="maximum epochs of phase 2 (default: the backbone's: B0 --epochs, Lite0 5 or --epochs if lower)")
    add("--val-split", type=float, default=d.val_split, help="validation fraction per class when splitting")
    add("--test-split", type=float, default=d.test_split, help="test fraction per class when splitting")
    add("--patience", type=int, default=d.patience, help="EarlyStopping patience (epochs)")
    add("--seed", type=int, default=d.seed)
    add("--lr", type=float, default=None, help="phase 1 (head) learning rate (default 1e-3; 1e-2 for --labels)")
    add("--finetune-lr", type=float, default=d.finetune_lr, help="phase 2 (fine-tuning) learning rate")
    add("--frozen-layers", type=int, default=d.frozen_layers,
        help="backbone layers kept frozen in phase 2 (default: 200 for B0, the same blocks, 132 layers, for Lite0)")
    add("--dropout", type=float, default=d.dropout)
    add("--backbone", choices=BACKBONES, default=None,
        help="default: efficientnet-lite0 (ImageNet weights ship with cxr); efficientnetb0 is the seed script's "
             "(its weights are downloaded); test-efficientnet is a small random-weight network for tests")
    add("--weights", default=d.weights, help="imagenet, none, or the path to a backbone weights file")
    add("--init-from", type=Path, help="start the backbone from another cxr model file of the same backbone (e.g. "
                                       "one trained on another dataset); the head starts anew")
    add("--port", type=int, default=d.port, help="serve TensorBoard on this port while training")
    add("--mixed-precision", action=argparse.BooleanOptionalAction, default=d.mixed_precision,
        help="bfloat16 on CPU, float16 on GPU, float32 outputs (default: off; slower on the CPUs measured)")
    add("--class-weight", choices=("none", "balanced"), default=d.class_weight)
    add("--deterministic", action=argparse.BooleanOptionalAction, default=d.deterministic,
        help="deterministic TensorFlow ops: the same seed gives the same numbers (cost not measurable on the "
             "README's sample, benchmarks/README.md)")
    add("--strict", action="store_true", help="fail on unreadable or non-image files instead of skipping them")
    add("--val-from-train", action=argparse.BooleanOptionalAction, default=d.val_from_train,
        help="carve validation from train (default: when val/ has fewer than 50 images)")
    add("--group-pattern", default=d.group_pattern,
        help="regex whose first group is the patient id in a file name (default: Kermany naming)")
    add("--feature-cache", action=argparse.BooleanOptionalAction, default=d.feature_cache,
        help="phase 1 on backbone features computed once (default); --no-feature-cache runs plain Keras")
    add("--feature-views", type=int, default=None,
        help="augmented views per training image in the feature cache; default: the backbone's (B0 2, Lite0 4)")
    add("--augment", choices=AUGMENTATIONS, default=None,
        help="training augmentation: seed (flip, rotate, zoom, shift), robust (+ brightness, contrast, sharpness, crops), "
             "site (+ burned-in markers and text, black edges) or site-aspect (site, with height and width zoomed "
             "apart); default: the backbone's (B0 seed, Lite0 site-aspect), seed for --labels")
    add("--monitor", choices=MONITORS, default=None,
        help="validation metric for early stopping, checkpoints and keeping phase 1 or 2 (default: val_accuracy; "
             "val_auc, the mean over findings, for --labels)")
    add("--label-smoothing", type=float, default=d.label_smoothing)
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (0: Adam)")
    add("--test-time-scales", type=float, nargs="+", default=None, metavar="SCALE",
        help="the saved model averages views of each image zoomed by these factors (below 1: wider field of view); "
             "default: the backbone's (B0 1, Lite0 0.9 1)")
    add("--positive-class", default=d.positive_class,
        help="class the threshold and sensitivity refer to (default: PNEUMONIA if present, else the second class)")
    add("--target-sensitivity", type=sensitivity_or_youden, default=d.target_sensitivity,
        help="pick the highest threshold reaching this sensitivity on validation (default 0.90); "
             "'youden' maximises Youden's J instead")
    add("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples for the confidence intervals")
    add("--precision", choices=PRECISIONS, default=d.precision,
        help="auto (default): serve int8 where it passes the accuracy guard on validation (AUC within 0.002 of "
             "float32, calls agreeing on 99 %%, calibrated probabilities within 0.05 at the 99th percentile and 0.15 on any "
             "image, ECE at most 0.01 higher, faster), else float32, running the second view only for "
             "the images the first leaves uncertain where that passes its own guard; float32: every view in float32; "
             "int8: int8 even if it fails the guard")
    add("--false-flag-rate", type=float, default=d.false_flag_rate,
        help="the population check flags this share of validation images as unlike the training images "
             "(default 0.005): lower flags fewer images of the training population, and fewer of other ones")
    add("--population-check", choices=("auto", "always"), default=d.population_check,
        help="auto: none where the validation split is under 99 images, too few to keep the check, with 95 %% "
             "confidence, from flagging more than 3 %% of images like the model's own (the model says why); always: "
             "fit it anyway")
    add("--age-bands", type=age_bands, default=d.age_bands,
        help="the subgroup analysis's age band edges (default 18,40,60,80: 0-17, 18-39, 40-59, 60-79, 80+)")
    add("--strategy", choices=STRATEGIES, default=d.strategy,
        help="tf.distribute: auto (mirrored on 2+ GPUs, else none), none, mirrored (every GPU, else every logical "
             "CPU), or multiworker (the machines in $TF_CONFIG; run the same command on each); --batch-size is the "
             "global batch, split between the replicas")
    add("--resume", action="store_true",
        help="continue the interrupted run in --output-dir from its last completed epoch (same options and data)")


class HelpFormatter(argparse.HelpFormatter):
    """--help with each option's default, unless its text already gives it (or there is none to give)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not text or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {default})"


def build_parser():
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray classifiers by transfer learning.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"cxr {cxr.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train, evaluate and write outputs/")
    _add_train_options(train)
    predict = commands.add_parser("predict", help="classify images with a saved model")
    predict.add_argument("paths", nargs="+", help="image files or folders of images")
    predict.add_argument("--model", default="outputs/models/model.h5")
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table")
    predict.add_argument("--batch-size", type=count(1), default=64)
    predict.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    predict.add_argument("--skipped-list", type=Path, default=None, metavar="FILE",
                         help="write every file that could not be predicted, and why, to this CSV")
    add_precision(predict)
    add_monitor_db(predict)

    evaluate = commands.add_parser("evaluate", help="evaluate a saved model on a folder of class subfolders")
    evaluate.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"))
    evaluate.add_argument("--data-dir", type=Path,
                          help="folder of <Class>/ subfolders (or with a test/ subfolder of them)")
    evaluate.add_argument("--splits", type=Path,
                          help="a training run's reports/splits.csv, instead of --data-dir: evaluate one of its splits")
    evaluate.add_argument("--split", default="test", help="with --splits: which split (default: test)")
    _add_label_options(evaluate, training=False)
    evaluate.add_argument("--output-dir", type=Path, default=Path("outputs/evaluation"))
    evaluate.add_argument("--bootstrap", type=count(0), default=2000, help="resamples for the confidence intervals")
    evaluate.add_argument("--seed", type=count(0), default=42)
    evaluate.add_argument("--batch-size", type=count(1), default=32)
    evaluate.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    evaluate.add_argument("--age-bands", type=age_bands, default=Config().age_bands,
                          help="age band edges of the subgroup analysis (default 18,40,60,80)")
    add_precision(evaluate)

    calibrate = commands.add_parser("calibrate", help="refit the operating point on a labelled sample of your site")
    calibrate.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"))
    calibrate.add_argument("--data-dir", type=Path,
                           help="the site's labelled sample: a folder of <Class>/ subfolders")
    _add_label_options(calibrate, training=False)
    calibrate.add_argument("--output-dir", type=Path, required=True,
                           help="where the calibrated copy (models/) and its reports go; the model is not changed")
    calibrate.add_argument("--target-sensitivity", type=sensitivity_or_youden, default=argparse.SUPPRESS,
                           help="highest threshold reaching this sensitivity on the sample, or 'youden' (default: "
                                "the rule the model was trained with)")
    calibrate.add_argument("--bootstrap", type=count(0), default=2000, help="resamples for the confidence intervals")
    calibrate.add_argument("--seed", type=count(0), default=42)

    explain = commands.add_parser("explain", help="Grad-CAM overlays showing where the model looked")
    explain.add_argument("paths", nargs="+", help="image files or folders of images")
    explain.add_argument("--model", default="outputs/models/model.h5")
    explain.add_argument("--output-dir", type=Path, default=Path("outputs/explain"))
    explain.add_argument("--class", dest="class_name", help="class to explain (default: the predicted one)")
    explain.add_argument("--tta", action="store_true", help="predict with flip TTA (the map is of the image as is)")

    serve = commands.add_parser("serve", help="a web page and a REST API for a saved model")
    serve.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"))
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: this machine only; another address prints a warning)")
    serve.add_argument("--port", type=count(1), default=8000)
    serve.add_argument("--api-key", default=os.environ.get("CXR_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/ (default: $CXR_API_KEY; none if unset)")
    serve.add_argument("--max-upload-mb", type=float, default=20, help="largest request body accepted (MB)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a host name the server answers to (repeatable); on loopback localhost, 127.0.0.1 and ::1 "
                            "always are; other Host headers get 400 (against DNS rebinding)")
    add_precision(serve)
    add_monitor_db(serve)

    listen = commands.add_parser("listen", help="a DICOM node: receive X-rays from a PACS, send the results back")
    listen.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"))
    listen.add_argument("--send-to", metavar="AE@HOST:PORT|URL",
                        help="the PACS (or any DICOM node) that stores the results: by C-STORE to AE@HOST:PORT, or by "
                             "STOW-RS to a DICOMweb base URL (http(s)://HOST:PORT/dicom-web; credentials from "
                             "$CXR_DICOMWEB_TOKEN, or $CXR_DICOMWEB_USER and $CXR_DICOMWEB_PASSWORD)")
    listen.add_argument("--output-dir", type=Path,
                        help="also write every result here (default: only results that can't be sent are kept, in "
                             "./cxr-listen/unsent/)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    listen.add_argument("--port", type=count(1), default=11112)
    listen.add_argument("--ae-title", default="CXR", help="cxr's AE title, the one the PACS sends to (default CXR)")
    listen.add_argument("--max-associations", type=count(1), default=4,
                        help="associations served at once; more are rejected, and the PACS tries again")
    listen.add_argument("--codes", type=Path, metavar="CSV", default=None,
                        help=CODES_OPTION_HELP + "; over those saved with the model")
    listen.add_argument("--metrics-port", type=count(1), metavar="PORT",
                        help="serve Prometheus metrics (associations, stores, results sent and kept unsent) at "
                             "http://HOST:PORT/metrics")
    add_precision(listen)
    add_monitor_db(listen)

    export = commands.add_parser("export", help="write the model as a SavedModel, TFLite or ONNX file for deployment")
    export.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"))
    export.add_argument("--format", nargs="+", choices=EXPORT_FORMATS, required=True, dest="formats",
                        help="one or more of: " + ", ".join(EXPORT_FORMATS))
    export.add_argument("--output-dir", type=Path, required=True)
    export.add_argument("--calibration-images", type=Path, metavar="DIR",
                        help="tflite-int8: training-like X-rays to calibrate int8 on (default: 200 of the training "
                             "split in the run's reports/splits.csv)")
    pull = commands.add_parser("pull", help="retrieve a cohort of X-rays from a PACS into a folder to train or "
                                            "evaluate on, with patient data removed")
    pull.add_argument("--from", dest="source", required=True, metavar="AE@HOST:PORT|URL",
                      help="the PACS: a DIMSE node (C-FIND, then C-GET) or a DICOMweb base URL (QIDO-RS, then "
                           "WADO-RS; credentials from $CXR_DICOMWEB_TOKEN, or $CXR_DICOMWEB_USER and "
                           "$CXR_DICOMWEB_PASSWORD)")
    pull.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                      help="match instances on a DICOM keyword (repeatable), e.g. Modality=DX, "
                           "StudyDate=20260101-20260131, BodyPartExamined=CHEST, StudyDescription=*THORAX*")
    pull.add_argument("--accessions", type=Path, metavar="FILE",
                      help="pull the studies of these accession numbers (one a line), with --query's keys too")
    pull.add_argument("--output-dir", type=Path, required=True,
                      help="the cohort's folder: manifest.csv, images/ (the same command resumes a killed pull)")
    pull.add_argument("--workers", type=count(1), default=4, help="instances fetched at once")
    pull.add_argument("--ae-title", default="CXR", help="cxr's AE title, the one the PACS lets query and retrieve")
    pull.add_argument("--keep-mapping", type=Path, metavar="CSV",
                      help="also write which pseudonymous key is which Patient ID and accession number to this CSV "
                           "(outside --output-dir; keep it private)")

    monitor = commands.add_parser("monitor", help="drift, realized performance and alerts from a prediction log")
    monitor.add_argument("--db", required=True, metavar="DB", help="the prediction log (--monitor-db of predict, "
                                                                     "serve or listen)")
    monitor.add_argument("--model", type=Path, default=Path("outputs/models/model.h5"),
                         help="the model whose answers to judge (its reference.npz beside it)")
    monitor.add_argument("--output-dir", type=Path, required=True, help="where monitor.json and monitor.html go")
    monitor.add_argument("--since", type=iso_time, help="only answers from this time on (ISO 8601, e.g. 2026-12-01)")
    group = monitor.add_mutually_exclusive_group()
    group.add_argument("--window", type=count(1), help="answers per window (default 500)")
    group.add_argument("--window-days", type=float, help="days per window, instead of a number of answers")
    monitor.add_argument("--labels", type=Path, metavar="CSV",
                         help="confirmed labels: a path, sop_instance_uid, image_id or image_key column, and a label "
                              "column (a class) or one 1/0 column per finding; gives realized performance")
    monitor.add_argument("--reference-data", type=Path, metavar="DIR",
                         help="for a model saved without reference.npz: labelled images (<Class>/ folders) to build "
                              "its reference from")
    monitor.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                         help="override an alert threshold (repeatable): " + ", ".join(
                             f"{f.name}={getattr(Thresholds(), f.name)}" for f in dataclasses.fields(Thresholds)))
    monitor.add_argument("--fail-on-alert", action="store_true",
                         help="exit 1 when the latest window has an alert (for cron and CI)")

    for command in commands.choices.values():
        command.formatter_class = HelpFormatter
        command.add_argument("--verbose", action="store_true",
                             help="show TensorFlow's, absl's and LiteRT's own log lines too")
        command.add_argument("--quiet", action="store_true", help="no progress bars (results and warnings only)")
        for action in command._actions:
            if action.help is None and action.dest in OPTION_HELP:
                action.help = OPTION_HELP[action.dest]
    return parser


def config_from_args(args):
    fields = Config.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    return Config(**values | {"views": views_or_all(values.get("views"))})


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_VARIABLE] = "1"
    if args.quiet:
        os.environ[QUIET_VARIABLE] = "1"
    quiet_libraries()
    try:
        if args.command == "train":
            from cxr.training import run

            summary = run.train(config_from_args(args))
            if summary is None:  # a multi-worker job's other worker: the chief wrote the outputs
                return 0
            print_headline(summary)
            print(f"Outputs in {args.output_dir}/ (models/model.h5, reports/report.html, reports/summary.json, plots/)")
        elif args.command == "predict":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # predict imports TensorFlow only to convert
            from cxr.commands.predict import PredictOptions, run_predict

            print(run_predict(args.paths, args.model, args.format, PredictOptions(
                args.batch_size, args.tta, args.skipped_list, args.precision, args.monitor_db)))
        elif args.command == "evaluate":
            from cxr.commands.evaluate import evaluate
            from cxr.evaluate import EvaluationOptions

            if sum(x is not None for x in (args.data_dir, args.splits, args.labels)) != 1:
                raise UserError("give --data-dir FOLDER, --splits reports/splits.csv or --labels CSV --images DIR "
                                "(one of them)")
            if (args.labels is None) != (args.images is None):
                raise UserError("--labels and --images go together: the CSV and the folder its paths start in")
            options = EvaluationOptions(args.bootstrap, args.seed, args.tta, args.batch_size,
                                        tuple(args.subgroups or ()), args.age_bands)
            splits = (args.splits, args.split) if args.splits else None
            labels = (args.labels, args.images, label_options(args)) if args.labels else None
            print_headline(evaluate(args.model, args.output_dir, options, args.data_dir, splits, labels,
                                        args.precision), "Evaluated images")
            print(f"Outputs in {args.output_dir}/ (reports/report.html, reports/metrics.csv, reports/summary.json, "
                  "plots/)")
        elif args.command == "calibrate":
            from cxr.commands.calibrate import calibrate
            from cxr.evaluate import EvaluationOptions

            if (args.data_dir is None) == (args.labels is None) or (args.labels is None) != (args.images is None):
                raise UserError("give the site's labelled sample as --data-dir FOLDER or as --labels CSV --images DIR")
            labels = (args.labels, args.images, label_options(args)) if args.labels else None
            summary = calibrate(args.model, args.data_dir, args.output_dir, EvaluationOptions(args.bootstrap, args.seed),
                                getattr(args, "target_sensitivity", "model"), labels)
            print_headline(summary, "Calibration sample (in-sample, optimistic)")
            print(f"Calibrated model in {args.output_dir}/models/ (model.h5, class_names.json); reports in "
                  f"{args.output_dir}/reports/. {args.model} is unchanged.")
        elif args.command == "serve":
            if not args.max_upload_mb > 0:
                raise UserError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
            from cxr.commands.serve import ServeOptions, serve

            serve(args.model, ServeOptions(args.host, args.port, args.api_key or None, args.max_upload_mb,
                                           args.precision, tuple(args.allowed_host), args.monitor_db))
        elif args.command == "listen":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            from cxr.commands.listen import Node, listen

            listen(args.model, args.send_to, args.output_dir, Node(args.host, args.port, args.ae_title,
                                                                   args.max_associations, args.metrics_port),
                   args.precision, args.monitor_db, args.codes)
        elif args.command == "monitor":
            from cxr.commands.monitor import MonitorOptions, monitor

            try:
                thresholds = Thresholds.parse(args.threshold or ())
            except ValueError as error:
                raise UserError(f"--threshold {error}") from None
            result = monitor(args.db, args.model, args.output_dir, MonitorOptions(
                args.window, args.window_days, args.since, args.labels, args.reference_data, thresholds))
            for alert in result["alerts"]:
                print(f"ALERT {alert['signal']}: {alert['message']}")
            print(f"{result['answers']} answers in {len(result['windows'])} windows; latest window: "
                  f"{len(result['alerts']) or 'no'} alert{'s' if len(result['alerts']) != 1 else ''}. Outputs in "
                  f"{args.output_dir}/ (monitor.json, monitor.html)")
            if args.fail_on_alert and result["alerts"]:
                return 1
        elif args.command == "pull":
            from cxr.commands.pull import PullOptions, parse_query, pull

            counts = pull(args.source, args.output_dir, PullOptions(parse_query(args.query), args.accessions,
                                                                     args.workers, args.ae_title, args.keep_mapping))
            print(f"{counts['pulled']} pulled, {counts['already']} already there, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed, of {counts['found']} matching instances. Outputs in "
                  f"{args.output_dir}/ (manifest.csv, images/)")
            if counts["failed"]:
                return 1
        elif args.command == "export":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            from cxr.commands.export import export

            for path, gives in export(args.model, args.formats, args.output_dir, args.calibration_images).items():
                print(f"{path}: {gives}")
        elif args.command == "explain":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            from cxr.commands.predict import run_explain

            for path in run_explain(args.paths, args.model, args.output_dir, args.class_name, args.tta):
                print(path)
    except UserError as error:
        print(f"cxr: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write that failed after the first checks: a full disk, permissions changed
        if error.errno in (errno.EEXIST, errno.ENOTDIR):
            print(f"cxr: error: {error.filename or 'an output folder'}: a file is where cxr needs a folder; give "
                  "an output folder path that is not a file", file=sys.stderr)
            return 2
        hint = "free some space" if error.errno == errno.ENOSPC else "check that folder's permissions"
        print(f"cxr: error: {error.filename or 'an output file'}: {error.strerror}; {hint} and run again "
              "(finished outputs are complete and unfinished ones are temporary files the next run removes; "
              "an interrupted training goes on from its last saved epoch with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr: interrupted; finished outputs are intact, unfinished ones were not written (an interrupted "
              "training goes on with the same command and --resume)", file=sys.stderr)
        return 130
    return 0
