"""Load on `cxr serve`: 1, 4 and 16 concurrent clients on loopback, each for a bounded time; then an explain-heavy
level and a large-image level.

    .venv/bin/python benchmarks/bench_serve.py --model outputs/models/model.h5 [--seconds 20]

Starts `cxr serve` in a child process, waits for /health/ready, warms it up, then per concurrency level runs
that many client threads, each posting one real X-ray per request (raw body, image/jpeg) in a loop until the
time is up. Prints images/s, p50/p95/p99 latency, errors (any status but 200), and the server's resident
memory before the first level and after the last. Targets (issue 14, 2-core machine): >= 150 images/s at 16
clients, p95 < 300 ms at 4, 0 errors, RSS growth < 50 MB. The clients share the server's 2 cores.

Then two stress levels, each `--seconds` long, while a monitor samples the server's memory and times
GET /health/live every 0.5 s: 48 clients asking for Grad-CAM (`explain=true`), and 4 clients each sending four
7000 x 7000 16-bit grey PNGs per request (under the 50 MP limit, about 100 KB each: they compress well). Printed:
answers by status (503 is the server shedding load, with Retry-After, which the clients wait out), images/s
answered, the health check's p95 and worst latency, and the server's memory through the level and at its peak.
`--levels` picks which run (default: all).
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


def start_server(model, port, precision="auto", extra=()):
    process = subprocess.Popen([sys.executable, "-m", "cxr", "serve", "--model", str(model), "--port", str(port),
                                "--precision", precision, *extra],
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


def post_jpeg(session, url, body, params=None):
    return session.post(url + "/v1/predict", data=body, headers={"Content-Type": "image/jpeg"}, params=params,
                        timeout=120)


def load(url, bodies, clients, seconds, send=post_jpeg, statuses=None):
    """(latencies in seconds of the successful requests, error count, wall time) for `clients` threads, each
    sending `send(session, url, body)` in a loop; `statuses`: a list that collects every answer's status."""
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
                answer = send(session, url, body)
                ok = answer.status_code == 200
                if statuses is not None:
                    statuses.append(answer.status_code)
                if answer.status_code == 503 and "Retry-After" in answer.headers:  # as a well-behaved client does
                    time.sleep(min(float(answer.headers["Retry-After"]), max(0.0, stop - time.perf_counter())))
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


def monitored(url, pid, run):
    """`run()`'s result, and (health-check latencies in s, RSS samples in MB) taken while it ran."""
    health, memory, done = [], [rss_mb(pid)], threading.Event()

    def monitor():
        while not done.is_set():
            start = time.perf_counter()
            try:
                requests.get(url + "/health/live", timeout=30)
                health.append(time.perf_counter() - start)
            except requests.RequestException:
                health.append(float("inf"))
            memory.append(rss_mb(pid))
            done.wait(0.5)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        result = run()
    finally:
        done.set()
        watcher.join()
    memory.append(rss_mb(pid))
    return result, np.array(health), np.array(memory)


def big_png():
    """A 7000 x 7000 16-bit grey PNG's bytes, flat regions as an X-ray export's borders (it compresses well)."""
    import io

    from PIL import Image

    array = np.full((7000, 7000), 1000, np.uint16)
    array[1750:3500] = 30000
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def stress(url, pid, name, clients, seconds, bodies, send, images_per_request=1):
    from collections import Counter

    statuses = []
    (latencies, errors, wall), health, memory = monitored(
        url, pid, lambda: load(url, bodies, clients, seconds, send, statuses))
    counts = ", ".join(f"{n} x {status}" for status, n in sorted(Counter(statuses).items()))
    quarters = " / ".join(f"{memory[round(q * (len(memory) - 1))]:.0f}" for q in (0, 0.25, 0.5, 0.75, 1))
    print(f"| {name} | {clients} | {counts or 'none'} ({errors - (len(statuses) - len(latencies))} failed to "
          f"connect) | {len(latencies) * images_per_request / wall:.1f} | {np.percentile(health, 95) * 1000:.0f} / "
          f"{health.max() * 1000:.0f} | {quarters} (peak {memory.max():.0f}) |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of X-rays (JPEG) to send")
    parser.add_argument("--seconds", type=float, default=20, help="per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--levels", nargs="+", default=["clients", "explain", "large"],
                        choices=["clients", "explain", "large"])
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "int8"],
                        help="as `cxr serve --precision` (float32: every view, whatever training chose)")
    args = parser.parse_args()

    files = sorted(args.images.rglob("*.jpeg"))[::25][:200]
    bodies = [f.read_bytes() for f in files]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, url = start_server(args.model, port, args.precision)
    try:
        load(url, bodies, 4, 3)  # warm-up: thread pools, allocator, the first batches
        before = rss_mb(process.pid)
        engine = requests.get(url + "/health/ready", timeout=10).json()["engine"]
        print(f"cxr serve {args.model} --precision {args.precision} ({engine}) on {os.cpu_count()} CPUs; "
              f"{len(bodies)} X-rays ({np.mean([len(b) for b in bodies]) / 1024:.0f} KB mean), one per request, "
              f"{args.seconds:g} s per level")
        if "clients" in args.levels:
            print("| clients | images/s | p50 ms | p95 ms | p99 ms | errors |")
            print("| --- | --- | --- | --- | --- | --- |")
            for clients in args.clients:
                latencies, errors, wall = load(url, bodies, clients, args.seconds)
                p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99]) if len(latencies) else (np.nan,) * 3
                print(f"| {clients} | {len(latencies) / wall:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {errors} |",
                      flush=True)
            after = rss_mb(process.pid)
            print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB)")
        print("\n| stress level | clients | answers by status | images/s answered | /health/live p95 / max ms | "
              "RSS MB at 0 / 25 / 50 / 75 / 100 % of the level |")
        print("| --- | --- | --- | --- | --- | --- |")
        if "explain" in args.levels:
            stress(url, process.pid, "explain=true", 48, args.seconds, bodies,
                   lambda session, url, body: post_jpeg(session, url, body, {"explain": "true"}))
        if "large" not in args.levels:
            return
        png = big_png()

        def four_big_pngs(session, url, body):
            return session.post(url + "/v1/predict", timeout=300,
                                files=[("files", (f"big{k}.png", png, "image/png")) for k in range(4)])
        stress(url, process.pid, f"4 x 7000 x 7000 16-bit PNG ({len(png) // 1024} KB each)", 4, args.seconds,
               bodies, four_big_pngs, images_per_request=4)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
