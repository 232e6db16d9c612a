"""Training speed by precision, XLA (jit_compile) and TensorFlow thread settings, each in its own process.

    .venv/bin/python benchmarks/archive/bench_xla.py --steps 30

For each setting, times the two things a default training run spends its time on, with cxr's own model code
(Lite0, 224 px, random images): the frozen prefix's forward pass (run once per image and view) and
fine-tuning steps of the tail (the part phase 2 trains, on cached prefix outputs). A last row times the
prefix converted to LiteRT, which runs it in float32 training runs. Prints images/s per setting.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LITERT = "LiteRT float32 (prefix only)"
FLOAT32 = {"policy": "float32", "jit": False, "intra": 0, "inter": 0}
SETTINGS = {
    "float32 (jit off, TF threads auto)": FLOAT32,
    "float32 jit_compile=True": FLOAT32 | {"jit": True},
    "float32 threads intra=2 inter=1": FLOAT32 | {"intra": 2, "inter": 1},
    "float32 threads intra=1 inter=1": FLOAT32 | {"intra": 1, "inter": 1},
    "mixed_bfloat16": FLOAT32 | {"policy": "mixed_bfloat16"},
    "mixed_bfloat16 jit_compile=True": FLOAT32 | {"policy": "mixed_bfloat16", "jit": True},
}


def measure(setting, steps, batch_size):
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(setting["intra"])
    tf.config.threading.set_inter_op_parallelism_threads(setting["inter"])
    import keras

    from cxr.model.networks import default_frozen_layers, freeze_backbone, unfreeze_backbone

    keras.mixed_precision.set_global_policy(setting["policy"])
    model, prefix, tail, images = lite0_parts(batch_size)
    freeze_backbone(model)
    unfreeze_backbone(model, default_frozen_layers(model, "efficientnet-lite0"))
    forward = prefix_speed(prefix, images, steps)
    x = np.asarray(prefix.predict_on_batch(images), dtype="float32")
    y = np.eye(2, dtype="float32")[np.arange(batch_size) % 2]
    tail.compile(optimizer=keras.optimizers.Adam(1e-5), loss="categorical_crossentropy", jit_compile=setting["jit"])
    for _ in range(3):  # warm-up (and XLA compilation)
        tail.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        tail.train_on_batch(x, y)
    return forward, steps * batch_size / (time.perf_counter() - start)


def prefix_speed(prefix, images, steps):
    """Images/s of the frozen prefix's forward pass (steps // 3 batches after one warm-up batch)."""
    prefix.predict_on_batch(images)
    start = time.perf_counter()
    for _ in range(max(1, steps // 3)):
        prefix.predict_on_batch(images)
    return max(1, steps // 3) * len(images) / (time.perf_counter() - start)


def lite0_parts(batch_size):
    """(model, frozen prefix, tail, a batch of random 224 px images) as cxr builds them for Lite0."""
    import keras
    import numpy as np

    from cxr.model.networks import build_classifier, default_frozen_layers, split_at_frozen_prefix

    keras.utils.set_random_seed(0)
    model = build_classifier("efficientnet-lite0", 2, weights="none")
    prefix, tail, _ = split_at_frozen_prefix(model, default_frozen_layers(model, "efficientnet-lite0"))
    images = np.random.default_rng(0).uniform(0, 255, (batch_size, 224, 224, 3)).astype("float32")
    return model, prefix, tail, images


def measure_litert(steps, batch_size):
    from cxr.bundle.litert import LiteRTModel, to_flatbuffer

    _, prefix, _, images = lite0_parts(batch_size)
    return prefix_speed(LiteRTModel(to_flatbuffer(prefix)), images, steps), None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (measure_litert(args.steps, args.batch_size) if args.child == LITERT
                  else measure(SETTINGS[args.child], args.steps, args.batch_size))
        print(json.dumps(result))
        return
    print(f"{'images/s':40s} {'prefix forward':>14} {'phase-2 train steps':>20}")
    for name in (*SETTINGS, LITERT):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name:40s} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        forward, train = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:40s} {forward:14.1f} {'-' if train is None else f'{train:.1f}':>20}")


if __name__ == "__main__":
    main()
