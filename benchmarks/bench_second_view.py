"""The second view only where the first leaves the answer uncertain: how often it is needed, what it costs in AUC.

    .venv/bin/python benchmarks/bench_second_view.py --run outputs

A model with test-time scales averages its views' pooled features before a linear head, so its output is the
activation of the views' mean logits: a first view's logits plus the other views' logits, averaged, give the
two-view output exactly. Run the first view for every image and the others only where the first view's
probability lies within `margin` of 0 or 1 (min(p, 1 - p) > margin), and the rest keep the first view's answer.

For the model in RUN/models (two-view default) and its RUN/reports/splits.csv, in one run on this machine:
- each view as a one-view LiteRT float32 model (2 threads, batches of 4), on the validation and test splits and
  on external_dev; the two-view output rebuilt from them is checked against the saved model's;
- the margin is fitted on validation: the largest on the grid at which validation keeps half the int8 guard's
  tolerances (AUC within 0.001 of the two views', calibrated probabilities within 0.025);
- for each first view (the image as it is, which the population check reads; the 0.9 view) and margin: the share
  of images that need the second view, the AUC difference from the two views, the largest calibrated probability
  difference, and the share of labels at the operating point that agree;
- images/s of the two-view model and of the on-demand pair at the fitted margin over test + external_dev.
external_dev is measured here, never used to fit.
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MARGINS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def logit(p):
    return np.log(np.clip(p, 1e-12, 1)) - np.log(np.clip(1 - p, 1e-12, 1))


def on_demand(first, others, margin):
    """(outputs, which images ran every view): `first` (n,) the first view's positive probability."""
    need = np.minimum(first, 1 - first) > margin
    mean = (logit(first) + sum(logit(o) for o in others)) / (1 + len(others))
    return np.where(need, 1 / (1 + np.exp(-mean)), first), need


def row(y, first, others, two, margin, temperature, threshold):
    from sklearn.metrics import roc_auc_score

    calibrated = lambda p: 1 / (1 + np.exp(-logit(p) / temperature))  # noqa: E731
    served, need = on_demand(first, others, margin)
    return {"second_view": need.mean(), "auc_diff": roc_auc_score(y, served) - roc_auc_score(y, two),
            "max_dp": np.abs(calibrated(served) - calibrated(two)).max(),
            "agree": np.mean((calibrated(served) >= threshold) == (calibrated(two) >= threshold))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from bench_engines import cpu_flags, decode_all, litert_engine, probabilities
    from cxr.bundle import litert
    from cxr.model import networks
    from cxr.bundle.saved_model import SavedModel

    name, flags = cpu_flags()
    print(f"CPU: {name}; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()))
    model = SavedModel.load(args.run / "models" / "model.h5", "float32")
    info = json.loads((args.run / "models" / "class_names.json").read_text())
    temperature, threshold, positive = info["temperature"], info["threshold"], model.positive_index
    scales = model.test_time_scales
    with open(args.run / "reports" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    sets = {s: ([r["path"] for r in rows if r["split"] == s],
                np.array([r["class"] == info["positive_class"] for r in rows if r["split"] == s])) for s in ("val", "test")}
    external = sorted(p for p in (SHARED / "chest_xray" / "external_dev").glob("*/*") if p.is_file())
    sets["external_dev"] = ([str(p) for p in external], np.array([p.parent.name == info["positive_class"]
                                                                   for p in external]))
    keras_model = model.keras_model
    engines = {"two": litert_engine("two", litert.to_flatbuffer(keras_model))}
    for scale in scales:
        engines[scale] = litert_engine(str(scale), litert.to_flatbuffer(networks.with_test_time_scales(keras_model,
                                                                                                      (scale,))))
    images, outputs = {}, {}
    for split, (paths, y) in sets.items():
        images[split] = decode_all(paths, model.img_size).astype(np.float32)
        outputs[split] = {e: probabilities(engine, images[split])[:, positive] for e, engine in engines.items()}
        rebuilt = on_demand(outputs[split][scales[0]], [outputs[split][s] for s in scales[1:]], -1)[0]
        print(f"{split}: {len(y)} images; AUC two views {roc_auc_score(y, outputs[split]['two']):.4f}, "
              + ", ".join(f"view {s} alone {roc_auc_score(y, outputs[split][s]):.4f}" for s in scales)
              + f"; two-view output rebuilt from the views within {np.abs(rebuilt - outputs[split]['two']).max():.1e}")

    fitted = {}
    print("| first view | margin | split | second view needed | AUC diff | max calibrated dp | labels agree |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for first in scales:
        others = [s for s in scales if s != first]
        cells = {split: {m: row(sets[split][1], outputs[split][first], [outputs[split][s] for s in others],
                                outputs[split]["two"], m, temperature, threshold) for m in MARGINS} for split in sets}
        kept = [m for m in MARGINS if cells["val"][m]["auc_diff"] >= -0.001 and cells["val"][m]["max_dp"] <= 0.025]
        fitted[first] = max(kept) if kept else None
        for m in MARGINS:
            for split in sets:
                c = cells[split][m]
                mark = " (fitted)" if m == fitted[first] else ""
                print(f"| {first} | {m:g}{mark} | {split} | {c['second_view']:.3f} | {c['auc_diff']:+.4f} | "
                      f"{c['max_dp']:.3f} | {c['agree']:.4f} |", flush=True)

    timed = np.concatenate([images["test"], images["external_dev"]])
    start = time.perf_counter()
    probabilities(engines["two"], timed)
    two_rate = len(timed) / (time.perf_counter() - start)
    for first, margin in fitted.items():
        if margin is None:
            continue
        others = [s for s in scales if s != first]
        start = time.perf_counter()
        p = probabilities(engines[first], timed)[:, positive]
        need = np.minimum(p, 1 - p) > margin
        for s in others:
            probabilities(engines[s], timed[need])
        rate = len(timed) / (time.perf_counter() - start)
        print(f"images/s over {len(timed)} test + external_dev images: two views {two_rate:.1f}; first view {first}, "
              f"the others on demand at margin {margin:g} ({need.mean():.1%} of images) {rate:.1f} "
              f"({rate / two_rate:.2f}x)")


if __name__ == "__main__":
    main()
