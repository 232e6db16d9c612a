"""One replica or two: `cxr train --strategy none` vs `--strategy mirrored` over two logical CPU devices.

    .venv/bin/python benchmarks/bench_distribute.py [--per-class 150] [--epochs 3]

Both runs use the same images (the first --per-class of each class of the real train folder, linked into a
train/ folder), Lite0 with ImageNet weights at 224 px, the same seed and global batch; each runs in a child
process, because logical devices must be set before TensorFlow starts. Prints per phase the seconds and the
training images per second (images x epochs run / seconds), and the test AUC. On one 2-core CPU, two replicas
share the same two cores: expect no gain; the point is that the same command runs on several devices.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "chest_xray" / "train"
CHILD = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(sys.argv[1]))
from cxr.cli import main

sys.exit(main(sys.argv[2:]))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-distribute-"))
    for class_dir in sorted(TRAIN.iterdir()):
        (work / "data" / "train" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:args.per_class]:
            (work / "data" / "train" / class_dir.name / image.name).symlink_to(image)
    print(f"{args.per_class} images per class from {TRAIN}, {args.epochs} epochs per phase, Lite0 224 px, batch 32")
    print("| strategy | replicas | phase 1 s | phase 1 img/s | phase 2 s | phase 2 img/s | test AUC |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for strategy, devices in (("none", 1), ("mirrored", 2)):
        out = work / strategy
        subprocess.run([sys.executable, "-c", CHILD, str(devices), "train", "--data-dir", str(work / "data"),
                        "--output-dir", str(out), "--strategy", strategy, "--backbone", "efficientnet-lite0",
                        "--epochs", str(args.epochs), "--patience", str(args.epochs), "--bootstrap", "0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads((out / "reports" / "summary.json").read_text())
        images = sum(summary["counts"]["train"].values())
        row = [strategy, str(summary["strategy"]["replicas"])]
        for phase in (1, 2):
            epochs = sum(1 for e in summary["history"] if e["phase"] == phase)
            seconds = summary["timings"][f"phase{phase}_seconds"]
            row += [f"{seconds:.1f}", f"{images * epochs / seconds:.0f}"]
        print("| " + " | ".join(row + [f"{summary['metrics']['auc']:.3f}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
