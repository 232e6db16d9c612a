"""Does a fixed seed give the same operating point, and what does `--deterministic` cost? (issue 46)

    .venv/bin/python benchmarks/bench_determinism.py [--data-dir examples/chest_xray_sample] [--runs 2]

Trains the same command with the same seed `--runs` times as it is, then `--runs` times with `--deterministic`
(TensorFlow's op determinism), each into a fresh output folder, one after the other on an otherwise idle machine,
and prints per run the wall time, the threshold, the temperature and the test metrics of summary.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(data_dir, output_dir, extra):
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cxr", "train", "--data-dir", str(data_dir), "--output-dir",
                           str(output_dir), "--quiet", *extra], capture_output=True, text=True,
                          env=os.environ | {"XDG_CACHE_HOME": str(output_dir / "cache")})
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((output_dir / "reports/summary.json").read_text())
    point = json.loads((output_dir / "models/class_names.json").read_text())
    return seconds, summary, point


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "examples/chest_xray_sample")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more cxr train options, after --")
    args = parser.parse_args()
    print(f"cxr train --data-dir {args.data_dir} {' '.join(args.extra)} (seed default), {os.cpu_count()} CPUs")
    print("| run | --deterministic | wall s | threshold | temperature | test AUC | sensitivity | specificity |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-determinism-") as scratch:
        for deterministic in (False, True):
            for run in range(args.runs):
                output = Path(scratch) / f"{deterministic}-{run}"
                seconds, summary, point = train(args.data_dir, output,
                                                [*args.extra, *(["--deterministic"] if deterministic else [])])
                m = summary["metrics"]
                print(f"| {run + 1} | {'yes' if deterministic else 'no'} | {seconds:.0f} | {point['threshold']:.4f} "
                      f"| {point['temperature']:.4f} | {m['auc_roc']:.4f} | {m['sensitivity']:.4f} | "
                      f"{m['specificity']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
