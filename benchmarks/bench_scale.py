"""Does memory stay flat as the dataset grows? One 1-epoch `cxr train` per dataset size on synthetic images.

    .venv/bin/python benchmarks/bench_scale.py --sizes 5000 50000 --img-size 224

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

CHILD = """
import json, re, sys, threading, time
peak = [0]
def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
def sample():
    while True:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
from cxr.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
peak[0] = max(peak[0], status("RssAnon"))
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_anon_mb": peak[0],
                  "vm_hwm_mb": status("VmHWM")}))
"""


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
    args = parser.parse_args()
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
