"""What each step of cxr's int8 conversion buys, on one trained model's validation split: the guard's numbers.

    .venv/bin/python benchmarks/bench_int8_layers.py --run outputs [--variants ...]

For the model in RUN/models (with its population taps, as training converts it) and the validation split of
RUN/reports/splits.csv, each variant of `litert.to_int8_flatbuffer` is calibrated on the same 200 seeded training
images and compared with float32 LiteRT: validation AUC; the int8 logits' shift from float32's (median) and the
noise around it (standard deviation); the calibrated probabilities' largest difference (what the guard bounds at
0.05), 99th and 95th percentiles; and images/s of int8 and float32 on 256 validation images, batches of 4.

Variants: `quantizer` (the quantizer's own output, with only the stem and block 1a in float32: cxr until
2026-12-04), `round-trip` (the probabilities' int8 round trip removed), `bias` (and the head's bias corrected),
`today` (and blocks 2a and 2b in float32: `litert.FLOAT_LAYER_PREFIXES`), and, after `bias`, more layers in
float32: `+block2,3`, `+block4,5`, `+block7,top`.
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr.bundle import litert  # noqa: E402

UNTIL_2026_12_04 = ("rescaling", "normalization", "stem_", "block1a_")
VARIANTS = {"quantizer": (UNTIL_2026_12_04, False, False), "round-trip": (UNTIL_2026_12_04, True, False),
            "bias": (UNTIL_2026_12_04, True, True), "today": (litert.FLOAT_LAYER_PREFIXES, True, True),
            "+block2,3": (UNTIL_2026_12_04 + ("block2", "block3"), True, True),
            "+block4,5": (UNTIL_2026_12_04 + ("block4", "block5"), True, True),
            "+block7,top": (UNTIL_2026_12_04 + ("block7", "top_"), True, True)}
CALIBRATION = 200


def convert(model, calibration, prefixes, drop_round_trip, correct_bias):
    """`litert.to_int8_flatbuffer` with the given float32 layers and post-processing steps."""
    kept = litert.FLOAT_LAYER_PREFIXES, litert.without_float_round_trips, litert.head_bias_corrected
    litert.FLOAT_LAYER_PREFIXES = prefixes
    if not drop_round_trip:
        litert.without_float_round_trips = lambda flatbuffer: flatbuffer
    if not correct_bias:
        litert.head_bias_corrected = lambda flatbuffer, model, images: flatbuffer
    try:
        return litert.to_int8_flatbuffer(model, calibration)
    finally:
        litert.FLOAT_LAYER_PREFIXES, litert.without_float_round_trips, litert.head_bias_corrected = kept


def log_odds(outputs, positive):
    p = np.clip(np.asarray(outputs, dtype=np.float64), 1e-30, 1)
    return np.log(p[:, positive]) - np.log(p[:, 1 - positive])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "outputs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    from cxr.data.decode import decode_image
    from cxr.model.inference import predict_outputs
    from cxr.bundle.fidelity import calibrated, speeds
    from cxr.evaluate.scoring import scoring
    from cxr.bundle.saved_model import SavedModel

    model = SavedModel.load(args.run / "models" / "model.h5", "float32")
    if model.multi_label or len(model.class_names) != 2:
        raise SystemExit("bench_int8_layers.py: a two-class model only")
    with open(args.run / "reports" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r["path"] for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    size, positive = model.img_size, model.positive_index
    images = np.stack([decode_image(r["path"], size) for r in val])
    y = np.array([model.class_names.index(r["class"]) for r in val])
    picked = np.random.default_rng(0).choice(len(train), min(CALIBRATION, len(train)), replace=False)
    calibration = np.stack([decode_image(train[k], size) for k in picked])
    classes = len(model.class_names)
    reference = model.raw_outputs(images)[0]
    timed = images[np.linspace(0, len(images) - 1, min(256, len(images))).astype(int)]
    print(f"model {args.run / 'models' / 'model.h5'}: {len(images)} validation images, int8 calibrated on "
          f"{len(calibration)} training images; float32 validation AUC {scoring(model.task).auc(y, reference):.5f}")
    print("| variant | validation AUC | logit shift | logit noise (sd) | max / p99 / p95 calibrated difference "
          "| images/s int8 vs float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.variants:
        start = time.perf_counter()
        int8 = litert.LiteRTModel(convert(model.tapped_model(), calibration, *VARIANTS[name]))
        seconds = time.perf_counter() - start
        outputs = predict_outputs(int8, images)[:, :classes]
        difference = np.abs(calibrated(y, reference, outputs, model.task)
                            - calibrated(y, reference, reference, model.task))
        difference = difference[:, positive]
        shift = log_odds(outputs, positive) - log_odds(reference, positive)
        unsaturated = np.abs(log_odds(reference, positive)) < 20
        timings = speeds({"int8": int8, "float32": model.predictor()}, timed)  # the best of 3 rounds, in turn
        rates = timings["int8"], timings["float32"]
        print(f"| {name} | {scoring(model.task).auc(y, outputs):.5f} | {np.median(shift[unsaturated]):+.3f} "
              f"| {np.std(shift[unsaturated]):.3f} | {difference.max():.3f} / {np.quantile(difference, 0.99):.3f} / "
              f"{np.quantile(difference, 0.95):.3f} | {rates[0]:.0f} vs {rates[1]:.0f} |", flush=True)
        print(f"  ({name}: converted in {seconds:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
