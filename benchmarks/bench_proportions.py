"""Does a model read a chest's proportions? Its scores when only the height or the width of the images changes.

    .venv/bin/python benchmarks/bench_proportions.py /tmp/gen/default-42 /tmp/gen/aspect-42

Each argument is the output folder of a `cxr train` run on the full train folder (bench_generalization.py leaves
them in --work). Every image of the run's validation and test splits and of external_dev is squeezed or
stretched along one axis (the other kept), centred, inside a black frame or cut to the side, as resizing a
non-square X-ray to a square distorts it differently for each device; the saved model (with its test-time views)
scores it. Reported per run, edit and data: AUC, and the median probability of the positive class of the
negative (NORMAL) images. A model that reads the lungs barely moves. Nothing is fitted on any of it.
"""

import argparse
from pathlib import Path

import numpy as np

from bench_test_time_scales import external_dev, run_splits

EDITS = {"as is": (1.0, 1.0), "width x0.85": (1.0, 0.85), "height x0.85": (0.85, 1.0), "width x1.15": (1.0, 1.15),
         "height x1.15": (1.15, 1.0), "both x0.9": (0.9, 0.9)}


def resized(x, height_scale, width_scale):
    """(n, side, side, 3) images with their content resized by the scales about the centre: a black frame where
    it shrinks, the edges cut where it grows."""
    import tensorflow as tf

    side = x.shape[1]
    height, width = int(round(side * height_scale)), int(round(side * width_scale))
    y = tf.image.resize(x, (height, width), method="bilinear")
    y = tf.image.crop_to_bounding_box(y, max(0, (height - side) // 2), max(0, (width - side) // 2),
                                      min(height, side), min(width, side))
    return tf.image.pad_to_bounding_box(y, (side - y.shape[1]) // 2, (side - y.shape[2]) // 2, side, side).numpy()


def main():
    import keras
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()

    data = external_dev(args.img_size)
    print(f"{'run':18s} {'edit':14s} " + " ".join(f"{n + ' AUC':>17s} {'NORMAL median':>13s}" for n in ("val", "test", "external_dev")))
    for run in args.runs:
        data.update(run_splits(run, args.img_size))
        model = keras.models.load_model(run / "models" / "model.h5", compile=False)
        for edit, scales in EDITS.items():
            cells = []
            for name in ("val", "test", "external_dev"):
                x, y = data[name]
                p = model.predict(resized(x, *scales), batch_size=32, verbose=0)[:, 1]
                cells.append(f"{roc_auc_score(y, p):17.4f} {np.median(p[~y]):13.3f}")
            print(f"{run.name:18s} {edit:14s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
