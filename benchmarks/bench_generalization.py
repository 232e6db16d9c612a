"""How recipes generalise: internal test split, external_dev (another period and selection of the same
hospital, the stand-in for another site), threshold rules, and acquisition shifts.

    .venv/bin/python benchmarks/bench_generalization.py --recipes default robust --seeds 42 1 2
    .venv/bin/python benchmarks/bench_generalization.py --probe-only

For every recipe and seed it trains on the full train folder with `cxr.training.run.train` (into --work/RECIPE-SEED,
skipped when that run's summary.json is already there, so an interrupted benchmark resumes; a recipe that
differs from another only in its test-time scales takes that recipe's trained run of the same seed and saves
its weights with its own views, refitting the operating point on validation as `cxr train` does), then
measures:
- internal: test AUC and ECE of the carved test split, from the run's summary.json;
- external_dev: AUC, ECE, and sensitivity / specificity / balanced accuracy at the saved operating point;
- threshold rules: the same external numbers, and the internal test split's, at thresholds that other rules
  choose on the run's own validation split (never on external data): Youden's J, sensitivity targets 0.95
  and 0.90 (cxr's default since 2026-11-26), specificity >= 0.98, and 0.5 on the calibrated probability;
- acquisition shifts: AUC on the internal test split after contrast, gamma, brightness, blur, sharpening,
  noise, JPEG re-compression, down-and-up scaling, crop/zoom and rotation, and their mean;
- shortcuts: the median probability of the positive class of the internal test split's negative images as
  they are and after each edit of cxr's shortcut check (`cxr.evaluate.shortcuts`): two burned-in markings,
  black bands over the outer 10% of each edge, the central 80% enlarged (a tighter field of view), the
  height stretched by 15% (a taller chest). A model that reads the lungs barely moves.
Each run's numbers are kept in its generalization.json (--remeasure recomputes them).
The linear probe (scikit-learn logistic regression, C=0.1, balanced, on frozen ImageNet Lite0 pooled
features of the un-augmented training images) is the reference row. external_dev is only measured here:
nothing is fitted on it.
"""

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chest_xray"
# Recipes as measured, so that they train the same whatever today's defaults are. Lite0's default: block 6c,
# the seed's augmentation and no cap on phase 2 until 2026-11-25 evening ("block6c"), then block 5a ("deep"),
# with the site augmentation from that night ("site"), block 4a for 5 epochs since 2026-11-26 ("block4"); block
# 3a for 4 epochs ("block3") was measured and not adopted; the saved model averages two views since 2026-11-26
# morning ("block4-2views"), training zooms height and width apart since that midday ("aspect"), from four
# augmented views of each image in the feature cache instead of two since that afternoon ("aspect-4views").
ONE_VIEW = {"test_time_scales": [1.0]}  # the saved model predicts from the image alone (as before 2026-11-26 morning)
TWO_CACHED = {"feature_views": 2}  # augmented views of each training image in the feature cache (until 2026-11-26 midday)
BLOCK6C = {"frozen_layers": 132, "augment": "seed", "finetune_epochs": 30, **ONE_VIEW, **TWO_CACHED}
BLOCK4 = {"frozen_layers": 50, "augment": "site", "finetune_epochs": 5, **TWO_CACHED}
TWO_VIEWS = {"test_time_scales": [0.9, 1.0]}
RECIPES = {
    "default": {},  # today's defaults (runs kept under this name from earlier are the defaults of their day)
    "block6c": BLOCK6C,
    "balanced": {**BLOCK6C, "class_weight": "balanced"},
    "robust": {**BLOCK6C, "augment": "robust", "class_weight": "balanced", "monitor": "val_auc"},
    "robust-ls": {**BLOCK6C, "augment": "robust", "class_weight": "balanced", "monitor": "val_auc",
                  "label_smoothing": 0.1, "weight_decay": 1e-4},
    "deep": {"frozen_layers": 79, "augment": "seed", "finetune_epochs": 30, **ONE_VIEW, **TWO_CACHED},
    "site": {"frozen_layers": 79, "augment": "site", "finetune_epochs": 30, **ONE_VIEW, **TWO_CACHED},
    "block4": {**BLOCK4, **ONE_VIEW},
    "block3": {"frozen_layers": 31, "augment": "site", "finetune_epochs": 4, **ONE_VIEW, **TWO_CACHED},
    "block4-2views": {**BLOCK4, **TWO_VIEWS},
    "aspect": {**BLOCK4, "augment": "site-aspect", **TWO_VIEWS},
    "aspect-4views": {**BLOCK4, "augment": "site-aspect", "feature_views": 4, **TWO_VIEWS},
    # The default of 2026-12-02 at 160 px (issue 31): each view costs half the multiply-adds of 224 px, so its two
    # views cost about what one did at 224. Measured, not adopted.
    "size160": {**BLOCK4, "augment": "site-aspect", "feature_views": 4, **TWO_VIEWS, "img_size": 160},
    # Today's default served as it was until 2026-12-03: every view for every image, float32 (issue 31) ...
    "every-view": {"precision": "float32"},
    # ... and the same weights served as today's `cxr train` serves them: int8 where it passes its guard, else
    # float32 with the views beyond the first only for uncertain images where that passes its own (views_on_demand)
    "on-demand": {},
}
# Recipes that differ from another only in what is done after training (the test-time scales): they reuse its
# trained weights (see `with_other_views`) instead of training again. (The recipes "distill" and
# "distill-teacher" measured --distill, removed on 2026-12-07; their numbers stay in benchmarks/README.md.)
SAME_TRAINING = {"block4-2views": "block4", "on-demand": "every-view"}
SENSITIVITY_TARGETS, SPECIFICITY_TARGET = (0.95, 0.90), 0.98


def shifts():
    """Acquisition shifts, each a function of a uint8 (H, W, 3) image, one moderate severity each."""
    from PIL import Image, ImageEnhance, ImageFilter

    def pil(f):
        return lambda x: np.asarray(f(Image.fromarray(x)).convert("RGB"), dtype=np.uint8)

    def jpeg(img, quality=30):
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    def crop_zoom(img, keep=0.85):
        w, h = img.size
        dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
        return img.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.BILINEAR)

    rng = np.random.default_rng(0)
    return {
        "contrast x0.6": pil(lambda i: ImageEnhance.Contrast(i).enhance(0.6)),
        "gamma 1.5": lambda x: np.uint8(np.clip(255 * (x / 255.0) ** 1.5 + 0.5, 0, 255)),
        "brightness +30": lambda x: np.uint8(np.clip(x.astype(int) + 30, 0, 255)),
        "blur r1.5": pil(lambda i: i.filter(ImageFilter.GaussianBlur(1.5))),
        "sharpen": pil(lambda i: i.filter(ImageFilter.UnsharpMask(radius=2, percent=150))),
        "noise sd8": lambda x: np.uint8(np.clip(x + rng.normal(0, 8, x.shape), 0, 255)),
        "jpeg q30": pil(jpeg),
        "down-up x0.5": pil(lambda i: i.resize((i.width // 2, i.height // 2), Image.BILINEAR).resize(i.size)),
        "crop/zoom 85%": pil(crop_zoom),
        "rotate 7deg": pil(lambda i: i.rotate(7, resample=Image.BILINEAR)),
    }


def binary_numbers(y, p_positive, threshold):
    from sklearn.metrics import roc_auc_score

    said = p_positive >= threshold
    sensitivity, specificity = said[y == 1].mean(), 1 - said[y == 0].mean()
    return {"auc": roc_auc_score(y, p_positive), "sensitivity": sensitivity, "specificity": specificity,
            "balanced_accuracy": (sensitivity + specificity) / 2}


def thresholds(y_val, p_val):
    """Threshold per rule, each chosen on validation only."""
    from sklearn.metrics import roc_curve

    from cxr.evaluate.metrics import choose_threshold

    fpr, _, cuts = roc_curve(y_val, p_val, drop_intermediate=False)
    finite = np.isfinite(cuts)
    specific = cuts[finite][np.flatnonzero(1 - fpr[finite] >= SPECIFICITY_TARGET)[-1]]
    return {"youden": choose_threshold(y_val == 1, p_val)[0],
            **{f"sensitivity>={t}": choose_threshold(y_val == 1, p_val, t)[0] for t in SENSITIVITY_TARGETS},
            f"specificity>={SPECIFICITY_TARGET}": float(specific),
            "0.5": 0.5}


def trained(run_dir, config):
    """(SavedModel, its training Dataset, external_dev as a Dataset), decoded, of one trained run."""
    from cxr.data.split import prepare_splits, read_labelled_folder
    from cxr.bundle.saved_model import SavedModel

    dataset = prepare_splits(config)
    dataset.decode(config.img_size, run_dir / "cache")
    model = SavedModel.load(run_dir / "models" / "model.h5")
    external = read_labelled_folder(DATA / "external_dev", model.class_names)
    external.decode(config.img_size, run_dir / "cache")
    return model, dataset, external


def with_other_views(trained_dir, run_dir, config):
    """Save into `run_dir` the model of the run in `trained_dir` as a run with `config` would have saved it:
    the same weights with `config.test_time_scales`, served at `config.precision` (`serving.choose`), its
    operating point fitted on the same validation split and evaluated on the same test split, as `cxr.training.run.train`
    does after training (its summary.json keeps the metrics, and the training time of the run it came from)."""
    from cxr.model import networks
    from cxr.bundle import precision, serving
    from cxr.data.split import prepare_splits
    from cxr.evaluate import EvaluationOptions, evaluate_model
    from cxr.training.run import fit_on_validation
    from cxr.bundle.saved_model import SavedModel

    dataset = prepare_splits(config)
    dataset.decode(config.img_size, run_dir / "cache")
    trained_model = SavedModel.load(trained_dir / "models" / "model.h5")
    model = SavedModel.from_keras(networks.with_test_time_scales(trained_model.keras_model, config.test_time_scales),
                                  trained_model.class_names, config.img_size, config.backbone, config.test_time_scales)
    model.predictor()
    fit_point = precision.default_point_fitter(model.task, trained_model.operating_point["positive_class"],
                                               config.target_sensitivity)
    serving.choose(model, dataset, config.precision, config.seed, fit_point)
    model.operating_point, (model.population, _) = fit_on_validation(model, dataset, fit_point, config)
    evaluation = evaluate_model(model, dataset, "test", EvaluationOptions(bootstrap=0, seed=config.seed))
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    (run_dir / "reports").mkdir(exist_ok=True)
    model.save(run_dir / "models")
    timings = json.loads((trained_dir / "reports" / "summary.json").read_text())["timings"]
    record = {"metrics": {k: float(evaluation.metrics[k]) for k in ("auc", "ece", "sensitivity", "specificity")},
              "timings": timings, "trained_in": str(trained_dir)}
    (run_dir / "reports" / "summary.json").write_text(json.dumps(record, default=float))


def measure(run_dir, config):
    """The numbers of one trained run (see the module docstring)."""
    from cxr.evaluate.metrics import expected_calibration_error

    summary = json.loads((run_dir / "reports" / "summary.json").read_text())
    model, dataset, external = trained(run_dir, config)
    positive = model.positive_index
    ext_rows, y_ext = external.split("evaluated")
    ext_probabilities = model.predict(external.images, ext_rows)[0]
    result = {"internal_auc": summary["metrics"]["auc"], "internal_ece": summary["metrics"]["ece"],
              "minutes": summary["timings"]["total_seconds"] / 60,
              "external": binary_numbers(y_ext, ext_probabilities[:, positive], model.operating_point["threshold"]),
              "external_ece": expected_calibration_error(y_ext, ext_probabilities)}
    result["rules"], result["internal_rules"] = threshold_rules(model, dataset, external)

    test_rows, y_test = dataset.split("test")
    clean = np.asarray(dataset.images[test_rows])
    result["shifts"] = {}
    for name, shift in shifts().items():
        shifted = np.stack([shift(x) for x in clean])
        result["shifts"][name] = binary_numbers(y_test, model.predict(shifted)[0][:, positive], 0.5)["auc"]
    result["shortcuts"] = shortcut_medians(model, dataset)
    return result


def fill_in(result, run_dir, config):
    """Add to a run's measured `result` the numbers that were added to the benchmark after it was measured."""
    from cxr.evaluate.shortcuts import probes

    rules_missing = "internal_rules" not in result
    shortcuts_missing = bool(set(probes()) - set(result.get("shortcuts", {})))
    if rules_missing or shortcuts_missing:
        model, dataset, external = trained(run_dir, config)
        if rules_missing:
            result["rules"], result["internal_rules"] = threshold_rules(model, dataset, external)
        if shortcuts_missing:
            result["shortcuts"] = shortcut_medians(model, dataset)
    return result


def threshold_rules(model, dataset, external):
    """({rule: external_dev numbers}, {rule: internal test numbers}) at the threshold each rule of `thresholds`
    chooses on the run's validation split."""
    def scores(data, split):
        rows, y = data.split(split)
        return y, model.predict(data.images, rows)[0][:, model.positive_index]

    chosen = thresholds(*scores(dataset, "val"))
    (y_ext, p_ext), (y_test, p_test) = scores(external, "evaluated"), scores(dataset, "test")
    return ({rule: binary_numbers(y_ext, p_ext, t) for rule, t in chosen.items()},
            {rule: binary_numbers(y_test, p_test, t) for rule, t in chosen.items()})


def shortcut_medians(model, dataset):
    """{as is / each edit of cxr's shortcut check (`cxr.evaluate.shortcuts.probes`): median positive-class
    probability of the test split's negatives}."""
    from cxr.evaluate.shortcuts import probes

    test_rows, y_test = dataset.split("test")
    negatives = np.asarray(dataset.images[test_rows[y_test != model.positive_index]])
    medians = {"as is": np.median(model.predict(negatives)[0][:, model.positive_index])}
    for name, edit in probes().items():
        medians[name] = np.median(model.predict(edit(negatives))[0][:, model.positive_index])
    return {name: float(value) for name, value in medians.items()}


def linear_probe(work):
    """Logistic regression on frozen ImageNet Lite0 pooled features (no augmentation, no fine-tuning)."""
    import keras
    from sklearn.linear_model import LogisticRegression

    from cxr.training.config import Config
    from cxr.data.split import prepare_splits, read_labelled_folder
    from cxr.model.inference import predict_outputs
    from cxr.bundle.litert import fast_inference
    from cxr.model.networks import build_classifier

    config = Config(data_dir=DATA, backbone="efficientnet-lite0")
    dataset = prepare_splits(config)
    dataset.decode(config.img_size, work / "cache")
    external = read_labelled_folder(DATA / "external_dev", dataset.class_names)
    external.decode(config.img_size, work / "cache")
    model = build_classifier("efficientnet-lite0", 2, "imagenet", config.img_size)
    features, _ = fast_inference(keras.Model(model.input, model.get_layer("avg_pool").output))

    def pooled(data, split):
        rows, y = data.split(split)
        return predict_outputs(features, data.images, rows), y

    x_train, y_train = pooled(dataset, "train")
    probe = LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000).fit(x_train, y_train)
    (x_val, y_val), (x_test, y_test), (x_ext, y_ext) = (pooled(dataset, "val"), pooled(dataset, "test"),
                                                        pooled(external, "evaluated"))
    threshold = thresholds(y_val, probe.predict_proba(x_val)[:, 1])["youden"]
    return {"internal_auc": binary_numbers(y_test, probe.predict_proba(x_test)[:, 1], 0.5)["auc"],
            "external": binary_numbers(y_ext, probe.predict_proba(x_ext)[:, 1], threshold)}


def mean_sd(values):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def report(results, probe):
    print(f"\n{'recipe':10} {'n':>2} {'internal AUC':>14} {'external AUC':>14} {'sensitivity':>14} "
          f"{'specificity':>14} {'bal. accuracy':>14} {'ext. ECE':>14} {'int. ECE':>14} {'minutes':>14}")
    for recipe, runs in results.items():
        ext = [r["external"] for r in runs]
        print(f"{recipe:10} {len(runs):2d} {mean_sd([r['internal_auc'] for r in runs]):>14} "
              f"{mean_sd([e['auc'] for e in ext]):>14} {mean_sd([e['sensitivity'] for e in ext]):>14} "
              f"{mean_sd([e['specificity'] for e in ext]):>14} {mean_sd([e['balanced_accuracy'] for e in ext]):>14} "
              f"{mean_sd([r['external_ece'] for r in runs]):>14} {mean_sd([r['internal_ece'] for r in runs]):>14} "
              f"{mean_sd([r['minutes'] for r in runs]):>14}")
    if probe:
        e = probe["external"]
        print(f"{'probe':10} {1:2d} {probe['internal_auc']:14.3f} {e['auc']:14.3f} {e['sensitivity']:14.3f} "
              f"{e['specificity']:14.3f} {e['balanced_accuracy']:14.3f}")
    if not results:
        return
    print("\nat thresholds chosen on validation by each rule (mean ± sd over seeds): sensitivity, specificity, "
          "balanced accuracy")
    print(f"{'recipe':10} {'rule':18} {'external_dev':^44}   {'internal test':^44}")
    for recipe, runs in results.items():
        for rule in runs[0]["rules"]:
            columns = []
            for where in ("rules", "internal_rules"):
                numbers = [r[where][rule] for r in runs]
                columns.append("  ".join(mean_sd([n[k] for n in numbers])
                                         for k in ("sensitivity", "specificity", "balanced_accuracy")))
            print(f"{recipe:10} {rule:18} {columns[0]}   {columns[1]}")
    print("\ninternal test AUC under acquisition shifts (mean over seeds)")
    names = list(next(iter(results.values()))[0]["shifts"])
    print(f"{'recipe':10} " + " ".join(f"{n[:13]:>13}" for n in names) + f" {'mean':>7}")
    for recipe, runs in results.items():
        per_shift = [np.mean([r["shifts"][n] for r in runs]) for n in names]
        print(f"{recipe:10} " + " ".join(f"{v:13.4f}" for v in per_shift) + f" {np.mean(per_shift):7.4f}")
    print("\ninternal test negatives, median probability of the positive class (mean over seeds)")
    measured = {recipe: runs for recipe, runs in results.items() if all("shortcuts" in r for r in runs)}
    names = list(next(iter(measured.values()))[0]["shortcuts"]) if measured else []
    print(f"{'recipe':10} " + " ".join(f"{n.split(' (')[0]:>18}" for n in names))
    for recipe, runs in measured.items():
        print(f"{recipe:10} " + " ".join(f"{np.mean([r['shortcuts'][n] for r in runs]):18.3f}" for n in names))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["default", "robust"], choices=RECIPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxr-generalization"), help="runs are kept here")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--probe-only", action="store_true")
    parser.add_argument("--remeasure", action="store_true", help="measure trained runs again")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cxr.training import run
    from cxr.training.config import Config

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "cache").mkdir(exist_ok=True)
    results = {}
    for recipe in [] if args.probe_only else args.recipes:
        for seed in args.seeds:
            run_dir = args.work / f"{recipe}-{seed}"
            config = Config(data_dir=DATA, output_dir=run_dir, backbone="efficientnet-lite0", seed=seed,
                            **RECIPES[recipe])
            if not (run_dir / "reports" / "summary.json").is_file():
                run_dir.mkdir(exist_ok=True)
                if not (run_dir / "cache").exists():
                    (run_dir / "cache").symlink_to(args.work / "cache")  # one decode cache for every run
                if recipe in SAME_TRAINING:
                    with_other_views(args.work / f"{SAME_TRAINING[recipe]}-{seed}", run_dir, config)
                else:
                    run.train(config)
            measured = run_dir / "generalization.json"
            if args.remeasure or not measured.is_file():
                result = measure(run_dir, config)
            else:
                result = fill_in(json.loads(measured.read_text()), run_dir, config)
            measured.write_text(json.dumps(result, default=float))
            results.setdefault(recipe, []).append(result)
            print(f"{recipe} seed {seed}: {json.dumps(results[recipe][-1], default=float)}", flush=True)
    probe = None if args.no_probe else linear_probe(args.work)
    report(results, probe)


if __name__ == "__main__":
    main()
