"""Phase-2 training step speed: XLA (jit_compile) and TensorFlow thread settings, each in its own process.

    .venv/bin/python benchmarks/bench_xla.py --steps 30

Times fine-tuning steps of the Lite0 tail (the part phase 2 trains, on cached frozen-prefix outputs of random
images) with cxr's own model code, so the numbers are the ones phase 2 sees. Prints images/s per setting.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default (jit off, TF threads auto)": {"jit": False, "intra": 0, "inter": 0},
    "jit_compile=True": {"jit": True, "intra": 0, "inter": 0},
    "threads intra=2 inter=1": {"jit": False, "intra": 2, "inter": 1},
    "threads intra=1 inter=1": {"jit": False, "intra": 1, "inter": 1},
}


def measure(setting, steps, batch_size):
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(setting["intra"])
    tf.config.threading.set_inter_op_parallelism_threads(setting["inter"])
    import keras

    from cxr.models import DEFAULT_FROZEN_LAYERS, build_classifier, freeze_backbone, unfreeze_backbone
    from cxr.train import split_at_frozen_prefix

    keras.utils.set_random_seed(0)
    model = build_classifier("efficientnet-lite0", 2, weights="none")
    freeze_backbone(model)
    unfreeze_backbone(model, DEFAULT_FROZEN_LAYERS["efficientnet-lite0"])
    prefix, tail, _ = split_at_frozen_prefix(model, DEFAULT_FROZEN_LAYERS["efficientnet-lite0"])
    x = prefix.predict(np.random.default_rng(0).uniform(0, 255, (batch_size, 224, 224, 3)), verbose=0)
    y = np.eye(2, dtype="float32")[np.arange(batch_size) % 2]
    tail.compile(optimizer=keras.optimizers.Adam(1e-5), loss="categorical_crossentropy", jit_compile=setting["jit"])
    for _ in range(3):  # warm-up (and XLA compilation)
        tail.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        tail.train_on_batch(x, y)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(SETTINGS[args.child], args.steps, args.batch_size)))
        return
    for name in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name:40s} failed: {out.stderr.strip().splitlines()[-1]}")
        else:
            print(f"{name:40s} {float(out.stdout.strip().splitlines()[-1]):7.1f} images/s (phase-2 train steps)")


if __name__ == "__main__":
    main()
