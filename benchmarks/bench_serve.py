"""Load on `cxr serve`: 1, 4 and 16 concurrent clients on loopback, each for a bounded time.

    .venv/bin/python benchmarks/bench_serve.py --model outputs/models/model.h5 [--seconds 20]

Starts `cxr serve` in a child process, waits for /health/ready, warms it up, then per concurrency level runs
that many client threads, each posting one real X-ray per request (raw body, image/jpeg) in a loop until the
time is up. Prints images/s, p50/p95/p99 latency, errors (any status but 200), and the server's resident
memory before the first level and after the last. Targets (issue 14, 2-core machine): >= 150 images/s at 16
clients, p95 < 300 ms at 4, 0 errors, RSS growth < 50 MB. The clients share the server's 2 cores.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "chest_xray" / "train"


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model, port):
    process = subprocess.Popen([sys.executable, "-m", "cxr", "serve", "--model", str(model), "--port", str(port)],
                               stderr=subprocess.DEVNULL, env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not get ready in 5 minutes")


def load(url, bodies, clients, seconds):
    """(latencies in seconds of the successful requests, error count, wall time) for `clients` threads."""
    latencies, errors, lock = [], [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k):
        session = requests.Session()
        mine, failed, i = [], 0, k
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += clients
            start = time.perf_counter()
            try:
                answer = session.post(url + "/v1/predict", data=body, headers={"Content-Type": "image/jpeg"}, timeout=30)
                ok = answer.status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                mine.append(time.perf_counter() - start)
            else:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies), errors[0], time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of X-rays (JPEG) to send")
    parser.add_argument("--seconds", type=float, default=20, help="per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    files = sorted(args.images.rglob("*.jpeg"))[::25][:200]
    bodies = [f.read_bytes() for f in files]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, url = start_server(args.model, port)
    try:
        load(url, bodies, 4, 3)  # warm-up: thread pools, allocator, the first batches
        before = rss_mb(process.pid)
        print(f"cxr serve {args.model} on {os.cpu_count()} CPUs; {len(bodies)} X-rays "
              f"({np.mean([len(b) for b in bodies]) / 1024:.0f} KB mean), one per request, {args.seconds:g} s per level")
        print("| clients | images/s | p50 ms | p95 ms | p99 ms | errors |")
        print("| --- | --- | --- | --- | --- | --- |")
        for clients in args.clients:
            latencies, errors, wall = load(url, bodies, clients, args.seconds)
            p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99]) if len(latencies) else (np.nan,) * 3
            print(f"| {clients} | {len(latencies) / wall:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {errors} |",
                  flush=True)
        after = rss_mb(process.pid)
        print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB)")
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
