"""Orthanc -> cxr listen -> Orthanc on loopback: the latency from the C-STORE to the results being stored, and
studies per minute.

    .venv/bin/python benchmarks/bench_pacs.py --model outputs/models/model.h5 [--studies 30]

A real Orthanc (Debian's `orthanc`) and a real `cxr listen` on free loopback ports, as in tests/test_listen.py.
Each study is the adult NIH DICOM of ../shared/data/dicom with new study, series and instance UIDs.
1. Latency, one study at a time: Orthanc's REST API C-STOREs the X-ray to cxr (synchronously); the clock runs
   from that request to both results (SR and Secondary Capture) being in the study in Orthanc (polled every
   50 ms).
2. Throughput: the studies uploaded back to back into an Orthanc that routes every new radiograph to cxr with
   docs/pacs.md's Lua script; studies per minute from the first upload to the last study's results stored.
"""

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
REAL_DICOM = ROOT.parent / "shared" / "data" / "dicom" / "nih-chestxray14-dx.dcm"

from tests.pacs import Listener, Orthanc, free_port, routing_script  # noqa: E402


def study_copies(n):
    """`n` copies of the real DICOM as files' bytes, each its own study."""
    import pydicom
    from pydicom.uid import generate_uid

    copies = []
    for _ in range(n):
        ds = pydicom.dcmread(REAL_DICOM)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        copies.append(buffer.getvalue())
    return copies


def wait_for_results(orthanc, study_id, timeout=300):
    deadline = time.monotonic() + timeout
    while len(orthanc.get(f"/studies/{study_id}").json()["Series"]) < 3:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no results for study {study_id} after {timeout} s")
        time.sleep(0.05)


def latency(model, studies, folder):
    port = free_port()
    orthanc = Orthanc(folder / "orthanc-latency", port)
    listener = Listener(model, port=port, send_to=orthanc.destination, cache=folder / "cache")
    try:
        seconds = []
        for k, data in enumerate(study_copies(studies + 1)):
            uploaded = orthanc.upload(data)
            start = time.perf_counter()
            orthanc.send_to_cxr([uploaded["ID"]])
            wait_for_results(orthanc, uploaded["ParentStudy"])
            if k:  # the first study also warms Grad-CAM up
                seconds.append(time.perf_counter() - start)
        return seconds, listener.stderr
    finally:
        listener.stop()
        orthanc.stop()


def throughput(model, studies, folder):
    port = free_port()
    orthanc = Orthanc(folder / "orthanc-routing", port, lua=routing_script())
    listener = Listener(model, port=port, send_to=orthanc.destination, cache=folder / "cache")
    try:
        warm = orthanc.upload(study_copies(1)[0])
        wait_for_results(orthanc, warm["ParentStudy"])
        copies = study_copies(studies)
        start = time.perf_counter()
        ids = [orthanc.upload(data)["ParentStudy"] for data in copies]
        uploaded = time.perf_counter() - start
        for study in ids:
            wait_for_results(orthanc, study)
        return studies / (time.perf_counter() - start) * 60, uploaded
    finally:
        listener.stop()
        orthanc.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "outputs" / "models" / "model.h5")
    parser.add_argument("--studies", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seconds, log = latency(args.model, args.studies, folder)
        per_minute, uploading = throughput(args.model, args.studies, folder)
    engine = log.split("(model ")[1].split(")")[0] if "(model " in log else "?"
    print(f"cxr listen ({engine}), Orthanc {orthanc_version()}, {os.cpu_count()} CPUs, one 1024 x 1024 DX per study")
    print(f"latency, C-STORE to SR + Secondary Capture stored, {len(seconds)} studies one at a time: "
          f"median {statistics.median(seconds):.2f} s, p95 {sorted(seconds)[int(0.95 * (len(seconds) - 1))]:.2f} s, "
          f"max {max(seconds):.2f} s")
    print(f"throughput, {args.studies} studies uploaded back to back ({uploading:.1f} s to upload) and routed by "
          f"docs/pacs.md's Lua script: {per_minute:.1f} studies per minute")


def orthanc_version():
    import subprocess

    from tests.pacs import orthanc_binary

    out = subprocess.run([orthanc_binary(), "--version"], capture_output=True, text=True).stdout
    return out.split()[1] if out else "?"


if __name__ == "__main__":
    main()
