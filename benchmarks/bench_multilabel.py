"""Multi-label training on the 414 NIH ChestX-ray14 images through their CSV (issue 27): per-finding and mean
AUC on held-out patients, for cxr's default recipe, a linear probe on frozen ImageNet features (the anchor),
and the variants named on the command line.

    .venv/bin/python benchmarks/bench_multilabel.py [--recipes default probe img320] [--seeds 42 1 2]
                                                     [--work /tmp/bench-multilabel]

Each seed splits the patients as `cxr train --labels` does (iterative stratification, 70/15/15, seeded), so
every recipe of a seed sees the same training, validation and test images. `default` is `cxr train --labels
Data_Entry_2017.csv --images images/` with every default (Lite0, ImageNet weights, 224 px); `probe` is a
scikit-learn logistic regression per finding (class-balanced, C chosen among 0.01, 0.1, 1 by validation mean
AUC) on the pooled top-layer features of Lite0 with ImageNet weights, one un-augmented pass per image, trained
on the same training split; other recipes are the default with the options in RECIPES. Prints one row per
recipe and seed (test mean AUC with its patient-level bootstrap CI, minutes) and the per-finding test AUCs;
then the mean and standard deviation over seeds.

414 images are far too few for clinical numbers (CheXNet trained on about 98,000): this compares recipes and
shows that the pipeline learns, nothing more.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "nih_chestxray14_sample"
RECIPES = {
    "default": {},
    # cxr's defaults for a labels CSV before this benchmark chose lr 1e-2 and the seed's augmentation
    "lr1e-3-site-aspect": {"lr": 1e-3, "augment": "site-aspect"},
    "img320": {"img_size": 320},
    "lr1e-2": {"lr": 1e-2},
    "lr1e-2-balanced": {"lr": 1e-2, "class_weight": "balanced"},
    "lr1e-2-ft1e-4": {"lr": 1e-2, "finetune_lr": 1e-4, "finetune_epochs": 10},
    "lr1e-2-ft1e-4-320": {"lr": 1e-2, "finetune_lr": 1e-4, "finetune_epochs": 10, "img_size": 320},
    "init": {"init_from": None},  # the model named by --init-from (e.g. the default run on Kermany's train/)
    "init-lr1e-2": {"init_from": None, "lr": 1e-2},
    "lr1e-2-seedaug": {"lr": 1e-2, "augment": "seed"},
    "lr1e-2-wd": {"lr": 1e-2, "weight_decay": 0.05},
    "init-lr1e-2-seedaug": {"init_from": None, "lr": 1e-2, "augment": "seed"},
    "views8": {"feature_views": 8},
    "balanced": {"class_weight": "balanced"},
    "epochs10": {"finetune_epochs": 10},
}


def train_recipe(name, seed, work, init_from=None):
    """summary.json of `cxr train --labels` with recipe `name` and `seed`."""
    from cxr.training.config import Config
    from cxr.training.run import train

    options = RECIPES[name] | ({"init_from": init_from} if "init_from" in RECIPES[name] else {})
    config = Config(labels=SAMPLE / "Data_Entry_2017.csv", images=SAMPLE / "images", backbone="efficientnet-lite0",
                    output_dir=work / f"{name}-{seed}", seed=seed, bootstrap=1000, **options)
    started = time.perf_counter()
    summary = train(config)
    summary["minutes"] = (time.perf_counter() - started) / 60
    return summary


def probe(seed, work):
    """The linear probe's test metrics on the split of `seed`, in summary.json's shape (metrics, intervals)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cxr.training.config import Config
    from cxr.data.labels_csv import read_labelled_table
    from cxr.evaluate.metrics import confidence_intervals, finding_metrics
    from cxr.bundle.litert import keras_predictor
    from cxr.model.networks import build_classifier

    started = time.perf_counter()
    config = Config(labels=SAMPLE / "Data_Entry_2017.csv", images=SAMPLE / "images", seed=seed)
    dataset = read_labelled_table(config.labels, config.images, config.label_options(), config)
    dataset.decode(224, work / "cache")
    import keras

    model = build_classifier("efficientnet-lite0", len(dataset.class_names), "imagenet", 224)
    pooled = keras_predictor(keras.Model(model.input, model.get_layer("avg_pool").output))
    features = np.concatenate([pooled.predict_on_batch(np.asarray(dataset.images[i:i + 32], np.float32))
                               for i in range(0, len(dataset.paths), 32)])
    scaler = StandardScaler().fit(features[dataset.splits["train"]])
    x = {s: scaler.transform(features[rows]) for s, rows in dataset.splits.items()}
    y = {s: dataset.labels[rows] for s, rows in dataset.splits.items()}

    def fit(c):
        return [LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x["train"], y["train"][:, k])
                for k in range(len(dataset.class_names))]

    def scores(fitted, split):
        return np.stack([m.predict_proba(x[split])[:, 1] for m in fitted], axis=1)

    def mean_auc(fitted, split):
        p = scores(fitted, split)
        return finding_metrics(y[split], p, p >= 0.5, dataset.class_names)["mean_auc"]

    best = max((0.01, 0.1, 1.0), key=lambda c: mean_auc(fit(c), "val"))
    fitted = fit(best)
    p = scores(fitted, "test")
    called = (p >= 0.5).astype(int)

    def stats(rows):
        return finding_metrics(y["test"][rows], p[rows], called[rows], dataset.class_names)

    metrics = stats(np.arange(len(p)))
    intervals = confidence_intervals(stats, y["test"], 1000, seed, patients=dataset.patients(dataset.splits["test"]))
    per_finding = {f: {"auc_roc": metrics[f"{f} auc_roc"]} for f in dataset.class_names}
    return {"metrics": {"mean_auc": metrics["mean_auc"], "per_finding": per_finding},
            "confidence_intervals": intervals, "minutes": (time.perf_counter() - started) / 60, "C": best}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["default", "probe"], choices=[*RECIPES, "probe"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-multilabel"))
    parser.add_argument("--init-from", type=Path, help="the model the init recipes start from")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in args.seeds:
        for name in args.recipes:
            summary = probe(seed, args.work) if name == "probe" else train_recipe(name, seed, args.work, args.init_from)
            m, ci = summary["metrics"], summary["confidence_intervals"]
            low, high = ci.get("mean_auc", [None, None])
            results.setdefault(name, []).append(m["mean_auc"])
            print(f"RESULT recipe={name} seed={seed} test_mean_auc={m['mean_auc']:.3f} "
                  f"ci=[{low:.3f}, {high:.3f}] minutes={summary['minutes']:.1f}", flush=True)
            print("  per finding: " + ", ".join(
                f"{f} {v['auc_roc']:.2f}" if v["auc_roc"] is not None and np.isfinite(v["auc_roc"]) else f"{f} n/a"
                for f, v in m["per_finding"].items()), flush=True)
            (args.work / f"result-{name}-{seed}.json").write_text(json.dumps(
                {"mean_auc": m["mean_auc"], "ci": [low, high], "minutes": summary["minutes"],
                 "per_finding": {f: v["auc_roc"] for f, v in m["per_finding"].items()}}))
    for name, values in results.items():
        print(f"SUMMARY recipe={name} test_mean_auc={np.mean(values):.3f} +- {np.std(values):.3f} over seeds "
              f"{' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
