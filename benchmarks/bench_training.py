"""Seed recipe vs cxr's default recipe: same data subset, same epochs, one after the other.

    .venv/bin/python benchmarks/bench_training.py --per-class 150 --epochs 3
    .venv/bin/python benchmarks/bench_training.py --full          # the whole train folder, 30 epochs
    .venv/bin/python benchmarks/bench_training.py --full --phase1-only   # the issue's phase-1 target, ~1.5 h

The seed recipe is the plain Keras script: image_dataset_from_directory + cache() in RAM, augmentation
layers in the model, the frozen backbone run in every epoch, float32. Each recipe runs in its own child
process so that peak RSS is its own. Prints images/s and wall time per phase, peak RSS and the speed-up.
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "chest_xray" / "train"


def make_subset(source, target, per_class, seed):
    """train/val/test (70/15/15) copies of `per_class` images per class, so both recipes see the same split."""
    rng = random.Random(seed)
    for class_dir in sorted(p for p in Path(source).iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        files = rng.sample(files, min(per_class, len(files))) if per_class else files
        n_val = n_test = round(0.15 * len(files))
        parts = {"val": files[:n_val], "test": files[n_val:n_val + n_test], "train": files[n_val + n_test:]}
        for split, chosen in parts.items():
            (target / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy2(f, target / split / class_dir.name / f.name)


def seed_recipe(data, args):
    import keras
    from sklearn.metrics import roc_auc_score
    import numpy as np

    from cxr.model.networks import build_backbone

    load = lambda split, shuffle: keras.utils.image_dataset_from_directory(
        data / split, image_size=(args.img_size, args.img_size), batch_size=32, label_mode="categorical",
        shuffle=shuffle, seed=42)
    train, val, test = load("train", True), load("val", False), load("test", False)
    n_train = sum(1 for _ in (data / "train").rglob("*.jpeg"))
    train, val = train.cache().prefetch(-1), val.cache().prefetch(-1)
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.05),
                                keras.layers.RandomZoom(0.1), keras.layers.RandomTranslation(0.05, 0.05)])
    inputs = keras.Input((args.img_size, args.img_size, 3))
    backbone = build_backbone(args.backbone, "imagenet", args.img_size, input_tensor=augment(inputs))
    backbone.trainable = False
    x = keras.layers.Dropout(0.25)(keras.layers.GlobalAveragePooling2D()(backbone.output))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    seconds = {}
    for phase, lr in (("phase1", 1e-3), ("phase2", 1e-5))[:1 if args.phase1_only else 2]:
        if phase == "phase2":
            backbone.trainable = True
            for layer in backbone.layers[:132 if args.backbone == "efficientnet-lite0" else 200]:
                layer.trainable = False
            for layer in backbone.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        model.fit(train, validation_data=val, epochs=args.epochs, verbose=0)
        seconds[phase] = time.perf_counter() - start
    y = np.concatenate([y.numpy().argmax(1) for _, y in test])
    p = model.predict(test, verbose=0)[:, 1]
    return {"seconds": seconds, "n_train": n_train, "test_auc": float(roc_auc_score(y, p))}


def cxr_recipe(data, args):
    from cxr.training import run
    from cxr.training.config import Config

    summary = run.train(Config(data_dir=data, output_dir=data.parent / "cxr-out", epochs=args.epochs,
                               finetune_epochs=args.epochs, patience=args.epochs + 1, backbone=args.backbone,
                               img_size=args.img_size, val_from_train=False))
    seconds = {k.replace("_seconds", ""): v for k, v in summary["timings"].items() if k != "total_seconds"}
    return {"seconds": seconds, "n_train": sum(summary["counts"]["train"].values()),
            "test_auc": summary["metrics"]["auc"]}


def child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    result = (seed_recipe if args.recipe == "seed" else cxr_recipe)(Path(args.data), args)
    result["wall_seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="a folder of <Class>/ folders")
    parser.add_argument("--per-class", type=int, default=150, help="images per class (0: all)")
    parser.add_argument("--full", action="store_true", help="all images and 30 epochs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per phase, no early stopping")
    parser.add_argument("--phase1-only", action="store_true",
                        help="skip the seed's phase 2 (cxr runs both phases; only phase 1 is compared)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--recipe", choices=("seed", "cxr"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe:
        return child(args)
    if args.full:
        args.per_class, args.epochs = 0, 30
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_subset(args.source, data, args.per_class, seed=42)
        results = {}
        for recipe in ("seed", "cxr"):
            command = [sys.executable, __file__, "--recipe", recipe, "--data", str(data), "--epochs",
                       str(args.epochs), "--img-size", str(args.img_size), "--backbone", args.backbone,
                       *(["--phase1-only"] if args.phase1_only else [])]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[recipe] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    n = results["seed"]["n_train"]
    print(f"{n} training images, {args.epochs} epochs per phase, {args.backbone} at {args.img_size} px, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'recipe':8} {'phase1 s':>9} {'img/s':>7} {'phase2 s':>9} {'img/s':>7} {'wall s':>7} {'peak RSS MB':>12} "
          f"{'test AUC':>9}")
    for recipe, r in results.items():
        s = r["seconds"]
        phase2 = (f"{s['phase2']:9.1f} {n * args.epochs / s['phase2']:7.1f}" if "phase2" in s
                  else f"{'-':>9} {'-':>7}")
        print(f"{recipe:8} {s['phase1']:9.1f} {n * args.epochs / s['phase1']:7.1f} {phase2} "
              f"{r['wall_seconds']:7.1f} {r['peak_rss_mb']:12.0f} {r['test_auc']:9.4f}")
    for phase in ("phase1",) if args.phase1_only else ("phase1", "phase2"):
        print(f"speed-up {phase}: {results['seed']['seconds'][phase] / results['cxr']['seconds'][phase]:.1f}x")


if __name__ == "__main__":
    main()
