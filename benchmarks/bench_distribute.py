"""One replica or two, one worker or two: `cxr train` under each `--strategy` on the same images.

    .venv/bin/python benchmarks/bench_distribute.py [--per-class 150] [--epochs 3]

Every run uses the same images (the first --per-class of each class of the real train folder, linked into a
train/ folder), Lite0 with ImageNet weights at 224 px, the same seed and global batch:
- none: one process, one replica;
- mirrored: one process, MirroredStrategy over two logical CPU devices;
- multiworker x1 / x2: MultiWorkerMirroredStrategy, one or two worker processes on 127.0.0.1 (TF_CONFIG).
Prints per phase the seconds and the training images per second (images x epochs run / seconds, on the chief),
and the test AUC. On one 2-core CPU, two replicas or two workers share the same two cores and add an all-reduce
per step: expect no gain; the point is that the same command runs on several devices or machines.
"""

import argparse
import json
import os
import socket
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
RUNS = (("none", "none", 1, 1), ("mirrored", "mirrored", 2, 1), ("multiworker x1", "multiworker", 1, 1),
        ("multiworker x2", "multiworker", 1, 2))  # label, --strategy, logical CPUs per process, processes


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def train(args, strategy, devices, workers):
    """Run one job of `workers` processes to the end."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    processes = []
    for index in range(workers):
        env = os.environ.copy()
        if strategy == "multiworker":
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen([sys.executable, "-c", CHILD, str(devices), "train", *args, "--strategy",
                                           strategy], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if any(p.wait() != 0 for p in processes):
        raise SystemExit(f"a {strategy} run failed; run its command by hand to see why: {args}")


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
    print("| strategy | processes | replicas | phase 1 s | phase 1 img/s | phase 2 s | phase 2 img/s | test AUC |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, strategy, devices, workers in RUNS:
        out = work / label.replace(" ", "-")
        train(["--data-dir", str(work / "data"), "--output-dir", str(out), "--backbone", "efficientnet-lite0",
               "--epochs", str(args.epochs), "--patience", str(args.epochs), "--bootstrap", "0"],
              strategy, devices, workers)
        summary = json.loads((out / "reports" / "summary.json").read_text())
        images = sum(summary["counts"]["train"].values())
        row = [label, str(workers), str(summary["strategy"]["replicas"])]
        for phase in (1, 2):
            epochs = sum(1 for e in summary["history"] if e["phase"] == phase)
            seconds = summary["timings"][f"phase{phase}_seconds"]
            row += [f"{seconds:.1f}", f"{images * epochs / seconds:.0f}"]
        print("| " + " | ".join(row + [f"{summary['metrics']['auc']:.3f}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
