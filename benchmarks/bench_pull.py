"""`cxr pull` from a real Orthanc on loopback: instances per minute over DIMSE (C-FIND, C-GET) and DICOMweb
(QIDO-RS, WADO-RS), at 1 and 4 workers.

    .venv/bin/python benchmarks/bench_pull.py [--instances 200] [--patients 50]

Orthanc (Debian's `orthanc` with `orthanc-dicomweb`) holds `--instances` copies of the adult NIH DICOM of
../shared/data/dicom (1 MB each), spread over `--patients` patients, each its own study. Each pull goes into a fresh
folder and is timed end to end as the command runs (a subprocess: start-up, the query, every fetch, the
de-identification and the writes), then checked: every instance in the manifest once, no Patient ID left.
"""

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_DICOM = ROOT.parent / "shared" / "data" / "dicom" / "nih-chestxray14-dx.dcm"

from tests.pacs import ORTHANC_AET, USER, Orthanc, free_port  # noqa: E402


def copies(n, patients):
    import pydicom
    from pydicom.uid import generate_uid

    for k in range(n):
        ds = pydicom.dcmread(REAL_DICOM)
        ds.PatientID, ds.PatientName = f"BENCH-{k % patients:04d}", f"Bench^{k % patients}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        yield buffer.getvalue()


def timed_pull(source, folder, workers):
    env = os.environ | {"CXR_DICOMWEB_USER": USER[0], "CXR_DICOMWEB_PASSWORD": USER[1]}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cxr", "pull", "--from", source, "--query", "Modality=DX",
                           "--output-dir", str(folder), "--workers", str(workers), "--quiet"],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    leaked = sum(b"BENCH-" in (folder / r["path"]).read_bytes() for r in rows)
    return seconds, len(rows), len({r["sop_instance_uid"] for r in rows}), leaked


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--patients", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        orthanc = Orthanc(folder / "orthanc", free_port(), dicomweb=True)
        try:
            started = time.perf_counter()
            for data in copies(args.instances, args.patients):
                orthanc.upload(data)
            print(f"{args.instances} instances of {args.patients} patients uploaded in "
                  f"{time.perf_counter() - started:.1f} s")
            dimse = f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}"
            print("protocol | workers | seconds | instances/min | rows | unique | Patient IDs left")
            for name, source in (("DIMSE", dimse), ("DICOMweb", orthanc.dicomweb_url)):
                for workers in (1, 4):
                    seconds, rows, unique, leaked = timed_pull(source, folder / f"{name}-{workers}", workers)
                    print(f"{name} | {workers} | {seconds:.1f} | {60 * rows / seconds:.0f} | {rows} | {unique} | "
                          f"{leaked}", flush=True)
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
