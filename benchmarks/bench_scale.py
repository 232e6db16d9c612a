"""Does memory stay flat as the dataset grows? One 1-epoch `cxr train` per dataset size on synthetic images;
or, with --csv-rows, a labels CSV read, split and decoded at each size.

    .venv/bin/python benchmarks/bench_scale.py --sizes 5000 50000 --img-size 224
    .venv/bin/python benchmarks/bench_scale.py --csv-rows 10000 50000 100000

--csv-rows writes an NIH-format CSV of N rows (N / 3 patients of three images each, the 414 real NIH sample
rows' labels repeated) whose images are symbolic links to the 414 real PNGs under distinct names, then times,
in a child process per size: reading the CSV (`data.labels_csv.read_table`), the patient-disjoint iterative
stratification, and decoding every image at 64 px through the decode cache (`Dataset.decode`); with the peak
anonymous RSS after each step.

Writes N random grey PNGs (two classes, train/val/test 70/15/15) under --workdir, runs the default recipe
(Lite0, feature cache on, 1 epoch per phase, no bootstrap) in a child process per size, and prints its peak
memory, two ways:
- peak anonymous RSS (sampled from /proc/self/status every 0.2 s): memory the run cannot give back;
- VmHWM, the kernel's peak RSS, what `top` shows: it would also count the pages of memory-mapped files, so
  it shows that the decode cache and the frozen-layer outputs stay on disk (they are read by rows through
  the page cache, not mapped).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# The child's memory sampler: `peak[0]` is the highest anonymous RSS (MB) seen, every 0.1 s.
SAMPLER = """
import json, re, sys, threading, time
from pathlib import Path
peak = [0]
def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
def sample():
    while True:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
"""

CHILD = SAMPLER + """
from cxr.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
peak[0] = max(peak[0], status("RssAnon"))
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_anon_mb": peak[0],
                  "vm_hwm_mb": status("VmHWM")}))
"""

CSV_CHILD = SAMPLER + """
from cxr.data.labels_csv import read_table, stratified_patient_splits, to_dataset
folder = Path(sys.argv[1])
result = {}
start = time.perf_counter()
table = read_table(folder / "labels.csv", folder / "images")
result["read_s"], result["read_peak_mb"] = time.perf_counter() - start, peak[0]
start = time.perf_counter()
splits = stratified_patient_splits(table, {"val": 0.15, "test": 0.15}, seed=42)
result["split_s"], result["split_peak_mb"] = time.perf_counter() - start, peak[0]
dataset = to_dataset(table, table.findings, splits)
start = time.perf_counter()
dataset.decode(64, folder / "cache")
result["decode_s"], result["decode_peak_mb"] = time.perf_counter() - start, max(peak[0], status("RssAnon"))
print(json.dumps(result))
"""


def make_labels_csv(folder, n):
    """An NIH-format CSV of n rows over symbolic links to the real NIH sample images (kept between runs)."""
    import csv

    marker = folder / "complete"
    if marker.is_file():
        return
    sample = ROOT.parent / "shared" / "data" / "nih_chestxray14_sample"
    with (sample / "Data_Entry_2017.csv").open(newline="") as f:
        header, *rows = list(csv.reader(f))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with (folder / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            row = list(rows[i % len(rows)])
            name = f"{i // 3:08d}_{i % 3:03d}.png"
            link = folder / "images" / name
            if not link.is_symlink():
                link.symlink_to(sample / "images" / row[0])
            row[0], row[2], row[3] = name, str(i % 3), str(i // 3)
            writer.writerow(row)
    marker.write_text(str(n))


def csv_scale(sizes, workdir):
    print(f"{'rows':>8} {'read s':>7} {'split s':>8} {'decode s':>9} {'peak anon RSS MB (read / split / decode)':>42}")
    for n in sizes:
        folder = workdir / f"csv-{n}"
        make_labels_csv(folder, n)
        run = subprocess.run([sys.executable, "-c", CSV_CHILD, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            print(f"{n:>8} failed: {run.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{n:>8} {r['read_s']:>7.1f} {r['split_s']:>8.1f} {r['decode_s']:>9.0f} "
              f"{r['read_peak_mb']:>20} / {r['split_peak_mb']} / {r['decode_peak_mb']}", flush=True)


def make_dataset(folder, n, size, seed=0):
    """n random grey PNGs, half per class, split 70/15/15 into train/val/test (kept between runs)."""
    marker = folder / "complete"
    if marker.is_file():
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "train" if i % 20 < 14 else "val" if i % 20 < 17 else "test"
        path = folder / split / ("A" if i % 2 else "B") / f"img{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(path)
    marker.write_text(str(n))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-bench-scale"))
    parser.add_argument("--csv-rows", type=int, nargs="+", help="measure a labels CSV of these many rows instead")
    args = parser.parse_args()
    if args.csv_rows:
        return csv_scale(args.csv_rows, args.workdir)
    print(f"{'images':>8} {'img px':>6} {'seconds':>8} {'peak anon RSS MB':>17} {'VmHWM MB':>9}")
    for n in args.sizes:
        data = args.workdir / f"data-{n}-{args.img_size}"
        make_dataset(data, n, args.img_size)
        command = ["train", "--data-dir", str(data), "--output-dir", str(args.workdir / f"out-{n}"), "--epochs", "1",
                   "--img-size", str(args.img_size), "--backbone", "efficientnet-lite0", "--weights", "none",
                   "--bootstrap", "0", "--no-mixed-precision"]
        run = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True, text=True, cwd=ROOT)
        result = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
        if not result or result["code"] != 0:
            print(f"{n:>8} failed: {run.stderr.strip().splitlines()[-1:]}")
            continue
        print(f"{n:>8} {args.img_size:>6} {result['seconds']:>8.0f} {result['peak_anon_mb']:>17} "
              f"{result['vm_hwm_mb']:>9}", flush=True)


if __name__ == "__main__":
    main()
