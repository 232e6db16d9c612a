"""Monitoring a deployed model (issue 49): what the prediction log costs, how `cxr monitor` scales, and how often
its default alerts fire on stable streams and how soon on shifted ones.

    .venv/bin/python benchmarks/bench_monitor.py --model outputs/models/model.h5 [--parts signals scale serve]

- signals: the model answers its own test split (splits.csv beside its reports), the adult NIH sample and its
  own test images as another scanner would give them (half the resolution, contrast and brightness changed).
  Streams are drawn from those answers (with replacement, a fixed seed) and judged window by window with
  `cxr.monitor.drift.judge` and the default thresholds: the false-alarm rate (windows of the model's own test
  images with any alert) and, with adults mixed in at 10, 25 and 50 % or every image from the other scanner,
  the share of windows that alert (each window after the shift has that chance, so the mean delay is the window
  divided by it). The reference is the model's reference.npz, or, for a model saved before it existed, its
  validation split's answers.
- scale: `cxr monitor` on 1,000,000 synthetic rows (the own test answers, repeated) in SQLite and in a throw-away
  PostgreSQL (tests/postgres.py): wall time and peak memory of the child process.
- serve: `cxr serve` images/s at 16 clients without the log, with SQLite and with PostgreSQL, alternated twice.
"""

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
NIH_IMAGES = ROOT.parent / "shared" / "data" / "nih_chestxray14_sample" / "images"


def answers(model, files, reference_sha=None):
    """Rows as the log holds them (probabilities, calls, in_distribution) for `files`."""
    from cxr.commands.predict import predict_files
    from cxr.monitor.log import file_properties

    found = predict_files(model, [str(f) for f in files])
    names = model.class_names
    rows = []
    for k, (p, label) in enumerate(zip(found.probabilities, found.labels)):
        calls = [names[j] for j in range(len(names)) if label[j]] if model.multi_label else [names[int(label)]]
        rows.append({"probabilities": {c: float(v) for c, v in zip(names, p)}, "calls": calls,
                     "in_distribution": None if found.check is None else bool(found.check.in_distribution[k]),
                     "population_score": None if found.check is None else float(found.check.scores[k]),
                     "model_sha256": model.sha256} | file_properties(found.files[k]))
    return rows, found


SCANNERS = {"scanner": (0.5, 1.3, 0.85), "mild scanner": (1.0, 1.1, 0.95)}  # (resolution, contrast, brightness)


def other_scanner(files, folder, scale, contrast, brightness):
    """The images at `scale` times their resolution, their contrast and brightness times those factors, saved in
    their own format."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        with Image.open(f) as img:
            if scale != 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.BILINEAR)
            img = ImageEnhance.Brightness(ImageEnhance.Contrast(img).enhance(contrast)).enhance(brightness)
            path = folder / Path(f).name  # the same format: what changes is what the scanner gives
            img.save(path, quality=95)
            out.append(path)
    return out


def reference_for(model, model_path, splits):
    from cxr.monitor.reference import Reference, input_counts

    try:
        return Reference.load(model_path, model.sha256)
    except Exception:  # noqa: BLE001 - a model saved before reference.npz: its validation answers instead
        val = [(row["path"], row["class"]) for row in splits if row["split"] == "val"]
        _, found = answers(model, [p for p, _ in val])
        labels = np.array([model.class_names.index(c) for _, c in val])
        calls = np.eye(len(model.class_names), dtype=np.int8)[np.asarray(found.labels)]
        return Reference(list(model.class_names), False, found.probabilities.astype(np.float32), calls, labels,
                         found.check.scores.astype(np.float32), float(model.population.false_flag_rate),
                         model.sha256, input_counts(found.files))


def streams(pools, reference, positive, window, trials, rng):
    """{stream: (share of windows with any alert, {signal: share of windows})}."""
    from cxr.monitor.drift import judge

    own, adults = pools["own"], pools["adults"]
    mixes = {"own test images (stable)": [(own, 1.0)], "adults 10 %": [(own, 0.9), (adults, 0.1)],
             "adults 25 %": [(own, 0.75), (adults, 0.25)], "adults 50 %": [(own, 0.5), (adults, 0.5)],
             "another scanner": [(pools["scanner"], 1.0)], "a milder scanner": [(pools["mild scanner"], 1.0)],
             "a milder scanner, 25 %": [(own, 0.75), (pools["mild scanner"], 0.25)]}
    start = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    result = {}
    for name, mix in mixes.items():
        alerted, signals = 0, {}
        for _ in range(trials):
            rows = []
            for pool, share in mix:
                picked = rng.integers(0, len(pool), int(round(window * share)))
                rows += [pool[i] for i in picked]
            rng.shuffle(rows)
            rows = [r | {"time": start + datetime.timedelta(minutes=k)} for k, r in enumerate(rows)]
            alerts = judge(rows, reference, positive)["alerts"]
            alerted += bool(alerts)
            for signal in {a["signal"] for a in alerts}:
                signals[signal] = signals.get(signal, 0) + 1
        result[name] = (alerted / trials, {s: c / trials for s, c in sorted(signals.items())})
    return result


def signals_part(model, model_path, splits, args):
    from cxr.monitor.drift import Thresholds

    rng = np.random.default_rng(0)
    test = [row["path"] for row in splits if row["split"] == "test"]
    adults = sorted(NIH_IMAGES.iterdir())
    reference = reference_for(model, model_path, splits)
    pools = json.loads(args.answers.read_text()) if args.answers and args.answers.is_file() else {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    try:  # the model's answers, kept in --answers between runs
        pools.setdefault("own", answers(model, test)[0])
        pools.setdefault("adults", answers(model, adults)[0])
        for name, shift in SCANNERS.items():
            if name not in pools:
                pools[name] = answers(model, other_scanner(test, scratch / name, *shift))[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.answers:
        args.answers.write_text(json.dumps(pools))
    flagged = {k: f"{k} {len(v)} ({np.mean([not r['in_distribution'] for r in v]):.1%} flagged)"
               for k, v in pools.items()}
    print(f"answers: {', '.join(flagged.values())}; other scanner: {SCANNERS} (resolution, contrast, brightness); "
          f"reference: {len(reference.probabilities)} validation images, flag rate {reference.flag_rate:.3f}")
    print(f"default thresholds: {Thresholds()}")
    positive = model.operating_point["positive_class"]
    print("\n| stream | window | windows | share of windows alerting | by signal |")
    print("| --- | --- | --- | --- | --- |")
    for window in args.windows:
        for name, (share, by_signal) in streams(pools, reference, positive, window, args.trials, rng).items():
            signals = ", ".join(f"{s} {v:.0%}" for s, v in by_signal.items()) or "-"
            print(f"| {name} | {window} | {args.trials} | {share:.1%} | {signals} |", flush=True)
    return pools["own"]


def write_rows(url, own, n, model_sha):
    """`n` rows of the own test answers, repeated, one minute apart, into the log at `url`."""
    from sqlalchemy import insert

    from cxr.monitor.log import open_database, tables

    engine, _ = open_database(url)
    _, predictions, _ = tables()
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    batch = 20_000
    for first in range(0, n, batch):
        rows = [{"time": start + datetime.timedelta(minutes=k), "model_sha256": model_sha, "command": "serve",
                 "image_key": f"{k:032x}", "label": "|".join(own[k % len(own)]["calls"]),
                 "probabilities": own[k % len(own)]["probabilities"], "calls": own[k % len(own)]["calls"],
                 "population_score": own[k % len(own)]["population_score"],
                 "in_distribution": own[k % len(own)]["in_distribution"], "width": own[k % len(own)].get("width"),
                 "height": own[k % len(own)].get("height"), "format": own[k % len(own)].get("format"),
                 "latency_ms": 30.0} for k in range(first, min(n, first + batch))]
        with engine.begin() as connection:
            connection.execute(insert(predictions), rows)
    engine.dispose()


def timed_monitor(url, model_path, output):
    """(seconds, peak MB) of `cxr monitor` in a child process."""
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "cxr", "monitor", "--db", url, "--model", str(model_path),
                              "--output-dir", str(output), "--quiet"], stderr=subprocess.PIPE, text=True)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(err[-2000:])
    return time.perf_counter() - began, usage.ru_maxrss / 1024


def scale_part(model, model_path, own, args):
    from tests.postgres import Postgres

    print("\n| database | rows | write s | cxr monitor s | cxr monitor peak MB |")
    print("| --- | --- | --- | --- | --- |")
    scratch = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    postgres = Postgres()
    try:
        for name, url in (("SQLite", str(scratch / "log.sqlite")), ("PostgreSQL 15", postgres.url)):
            began = time.perf_counter()
            write_rows(url, own, args.rows, model.sha256)
            written = time.perf_counter() - began
            seconds, peak = timed_monitor(url, model_path, scratch / name)
            print(f"| {name} | {args.rows:,} | {written:.0f} | {seconds:.0f} | {peak:.0f} |", flush=True)
    finally:
        postgres.remove()
        shutil.rmtree(scratch, ignore_errors=True)


def serve_part(model_path, args):
    from bench_serve import load, start_server

    from tests.pacs import free_port
    from tests.postgres import Postgres

    files = sorted((ROOT.parent / "shared/data/chest_xray/train").rglob("*.jpeg"))[::25][:200]
    bodies = [f.read_bytes() for f in files]
    scratch = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    postgres = Postgres()
    results = {}
    try:
        for _ in range(2):
            for name, extra in (("no log", ()), ("SQLite", ("--monitor-db", str(scratch / "s.sqlite"))),
                                ("PostgreSQL", ("--monitor-db", postgres.url))):
                process, url = start_server(model_path, free_port(), extra=extra)
                try:
                    load(url, bodies, 4, 3)
                    latencies, errors, wall = load(url, bodies, 16, args.seconds)
                    results.setdefault(name, []).append((len(latencies) / wall, errors))
                finally:
                    process.terminate()
                    process.wait()
        print(f"\n| cxr serve, 16 clients, {args.seconds:g} s a run | images/s (two runs, alternated) | errors |")
        print("| --- | --- | --- |")
        for name, runs in results.items():
            print(f"| {name} | {' / '.join(f'{r:.1f}' for r, _ in runs)} | {sum(e for _, e in runs)} |")
    finally:
        postgres.remove()
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", default=["signals", "scale", "serve"],
                        choices=["signals", "scale", "serve"])
    parser.add_argument("--windows", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--trials", type=int, default=500, help="windows drawn per stream and window size")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--answers", type=Path, help="a JSON file keeping the model's answers between runs")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["CXR_QUIET"] = "1"
    from cxr.bundle.saved_model import SavedModel

    model = SavedModel.load(args.model)
    with open(args.model.parent.parent / "reports" / "splits.csv") as f:
        splits = list(csv.DictReader(f))
    print(f"model {args.model} ({model.sha256[:12]}), {os.cpu_count()} CPUs, {datetime.date.today()}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-monitor-model-"))
    try:
        model_path = with_reference(model, args.model, splits, scratch)
        own = None
        if "signals" in args.parts or "scale" in args.parts:
            own = signals_part(model, model_path, splits, args) if "signals" in args.parts else answers(
                model, [r["path"] for r in splits if r["split"] == "test"])[0]
        if "scale" in args.parts:
            scale_part(model, model_path, own, args)
        if "serve" in args.parts:
            serve_part(model_path, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def with_reference(model, model_path, splits, scratch):
    """`model_path`, or for a model saved before reference.npz, a folder of links to its files beside the
    reference built from its validation answers (what `cxr monitor` reads)."""
    from cxr.monitor.reference import REFERENCE_FILE

    if (model_path.parent / REFERENCE_FILE).is_file():
        return model_path
    for f in model_path.parent.iterdir():
        (scratch / f.name).symlink_to(f.resolve())
    reference_for(model, model_path, splits).save(scratch)
    print(f"(no {REFERENCE_FILE} beside the model: built from its {sum(r['split'] == 'val' for r in splits)} "
          "validation images)")
    return scratch / model_path.name


if __name__ == "__main__":
    main()
