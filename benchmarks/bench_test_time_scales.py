"""Do zoomed test-time views help? AUC of trained runs' models averaging views zoomed by several scale sets.

    .venv/bin/python benchmarks/bench_test_time_scales.py /tmp/gen/default-42 /tmp/gen/default-1 /tmp/gen/default-2

Each argument is the output folder of a `cxr train` run on the full train folder (bench_generalization.py leaves
them in --work). Its model's one view is taken (`models.with_test_time_scales(model, [1])`) and each scale's view
made by `models.zoomed`, as a saved model with test-time scales makes it; a set of scales averages the views'
logits, as `with_test_time_scales` does (checked against it on a few images). Reported per run and set: AUC on
the run's validation split (where a set would be chosen), its test split and external_dev. AUC needs no
threshold, so nothing is fitted on external_dev.
"""

import argparse
import csv
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)
SETS = ([1.0], [0.9], [0.9, 1.0], [0.9, 1.0, 1.1], [0.8, 0.9, 1.0], [1.0, 1.1, 1.2], list(SCALES))


def images(paths, size):
    from cxr.data.decode import decode_image

    return np.stack([decode_image(p, size) for p in paths]).astype(np.float32)


def external_dev(size):
    """{"external_dev": (images, is-PNEUMONIA)}: external_dev's images, decoded as cxr decodes them."""
    paths = sorted((DATA / "external_dev").glob("*/*.jpeg"))
    return {"external_dev": (images(paths, size), np.array([p.parent.name == "PNEUMONIA" for p in paths]))}


def run_splits(run, size):
    """{"val" / "test": (images, is-PNEUMONIA)}: the validation and test splits of the `cxr train` run in `run`."""
    rows = list(csv.DictReader(open(run / "reports" / "splits.csv")))
    splits = {}
    for split in ("val", "test"):
        chosen = [row for row in rows if row["split"] == split]
        splits[split] = (images([row["path"] for row in chosen], size),
                         np.array([row["class"] == "PNEUMONIA" for row in chosen]))
    return splits


def log_odds(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def main():
    import keras
    from sklearn.metrics import roc_auc_score

    from cxr.model.networks import with_test_time_scales

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()

    data = external_dev(args.img_size)
    print(f"{'run':24s} {'scales':28s} {'val AUC':>8s} {'test AUC':>9s} {'external_dev AUC':>17s}")
    for run in args.runs:
        data.update(run_splits(run, args.img_size))
        model = keras.models.load_model(run / "models" / "model.h5", compile=False)
        one_view = with_test_time_scales(model, [1.0])
        odds = {(name, scale): log_odds(with_test_time_scales(one_view, [scale]).predict(x, batch_size=32, verbose=0)[:, 1])
                for name, (x, _) in data.items() for scale in SCALES}
        check = with_test_time_scales(one_view, [0.9, 1.0, 1.1]).predict(data["val"][0][:16], verbose=0)[:, 1]
        assert np.allclose(log_odds(check), np.mean([odds["val", s][:16] for s in (0.9, 1.0, 1.1)], axis=0), atol=1e-3)
        for scales in SETS:
            aucs = [roc_auc_score(y, np.mean([odds[name, s] for s in scales], axis=0))
                    for name, (_, y) in (("val", data["val"]), ("test", data["test"]), ("external_dev", data["external_dev"]))]
            print(f"{run.name:24s} {', '.join(f'{s:g}' for s in scales):28s} {aucs[0]:8.4f} {aucs[1]:9.4f} {aucs[2]:17.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
