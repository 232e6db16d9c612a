"""Would an ensemble generalise better? Phase and seed ensembles of finished runs, on external_dev.

    .venv/bin/python benchmarks/archive/bench_ensembles.py /tmp/gen/default-42 /tmp/gen/default-1 /tmp/gen/default-2

Each argument is the output folder of a `cxr train` run on the full train folder (bench_generalization.py
leaves them in --work). Per run: the AUC on external_dev and on the run's own test split (from its
reports/splits.csv) of its best phase-1 checkpoint, its best phase-2 checkpoint, its final model.h5, and the
mean of the two checkpoints' probabilities (a phase ensemble); then the AUC of the mean of all runs' final
models (a seed ensemble) on external_dev. AUC needs no threshold, so nothing is fitted on external_dev.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr.data.decode import decode_image

EXTERNAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "chest_xray" / "external_dev"
MODELS = {"phase 1": "best_feature_extractor.keras", "phase 2": "best_finetuned.keras", "final": "model.h5"}


def images(paths, size):
    return np.stack([decode_image(p, size) for p in paths]).astype(np.float32)


def main():
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()

    external = sorted(EXTERNAL.glob("*/*.jpeg"))
    y_external = np.array([p.parent.name == "PNEUMONIA" for p in external], dtype=int)
    x_external = images(external, args.img_size)
    finals = []
    print("| run | model | external_dev AUC | internal test AUC |")
    print("| --- | --- | --- | --- |")
    for run in args.runs:
        test = [row for row in csv.DictReader(open(run / "reports" / "splits.csv")) if row["split"] == "test"]
        x_test = images([row["path"] for row in test], args.img_size)
        y_test = np.array([row["class"] == "PNEUMONIA" for row in test], dtype=int)
        scores = {}
        for name, file in MODELS.items():
            model = keras.models.load_model(run / "models" / file, compile=False)
            scores[name] = (model.predict(x_external, batch_size=32, verbose=0)[:, 1],
                            model.predict(x_test, batch_size=32, verbose=0)[:, 1])
        scores["phase 1 + 2 mean"] = tuple((a + b) / 2 for a, b in zip(scores["phase 1"], scores["phase 2"]))
        finals.append(scores["final"][0])
        for name, (p_external, p_test) in scores.items():
            print(f"| {run.name} | {name} | {roc_auc_score(y_external, p_external):.4f} | "
                  f"{roc_auc_score(y_test, p_test):.4f} |", flush=True)
    print(f"\nseed ensemble (mean of {len(finals)} final models) on external_dev: AUC "
          f"{roc_auc_score(y_external, np.mean(finals, axis=0)):.4f}")


if __name__ == "__main__":
    main()
