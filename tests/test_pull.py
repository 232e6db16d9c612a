"""`cxr pull` (issue 47, item 4) against a real PACS: Debian's Orthanc with its DICOMweb plugin, on loopback."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.pacs import DICOMWEB_PLUGIN, ORTHANC_AET, USER, Orthanc, free_port, orthanc_binary
from tests.test_listen import REAL_DICOM

DX, CR = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
# patient data the built instances carry; none of it may be in a pulled file
NAMES, IDS, DATES, ACCESSIONS = ("Doe^Jane", "Roe^Richard"), ("PAT-A", "PAT-B"), ("19700101", "20260115"), "ACC-"
CREDENTIALS = {"CXR_DICOMWEB_USER": USER[0], "CXR_DICOMWEB_PASSWORD": USER[1]}


def built(patient, study_date, accession, modality="DX", sop_class=DX, view="PA", **elements):
    """A small radiograph of `patient` (0 or 1) as a DICOM file's bytes, with a private tag and an institution."""
    from cxr.commands.dicom_results import to_bytes

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = NAMES[patient], IDS[patient], DATES[0], "F"
    ds.PatientAge = "056Y"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study_date, "101500", accession
    ds.InstitutionName, ds.ReferringPhysicianName = "Saint Example Hospital", "Who^Doctor"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = modality, view, "CHEST"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).tobytes()
    ds.add_new(0x00091010, "LO", "a private note naming Doe^Jane")
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds.SOPInstanceUID, to_bytes(ds)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """(Orthanc with DICOMweb, {name: SOP Instance UID}) holding the real adult DICOM and built instances."""
    if orthanc_binary() is None or not DICOMWEB_PLUGIN.is_file():
        if os.environ.get("CI"):
            pytest.fail("Orthanc and its DICOMweb plugin are not installed (.ci/run installs orthanc, "
                        "orthanc-dicomweb)")
        pytest.skip("Orthanc or its DICOMweb plugin is not installed")
    if not REAL_DICOM.is_file():
        pytest.skip("../shared/data/dicom is not here")
    # it refuses an association called by another AE title than its own
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), dicomweb=True,
                      settings={"DicomCheckCalledAet": True})
    cohort = {
        "a-january": built(0, "20260115", "ACC-1"),
        "a-january-ap": built(0, "20260120", "ACC-2", view="AP", sop_class=CR, modality="CR"),
        "b-january": built(1, "20260131", "ACC-3"),
        "b-february": built(1, "20260210", "ACC-4"),
        "b-january-ct": built(1, "20260115", "ACC-5", modality="CT", sop_class=CT),
        "a-january-burned-in": built(0, "20260116", "ACC-6", BurnedInAnnotation="YES"),
    }
    for _, data in cohort.values():
        orthanc.upload(data)
    real = pydicom.dcmread(REAL_DICOM)
    orthanc.upload(REAL_DICOM.read_bytes())
    yield orthanc, {name: uid for name, (uid, _) in cohort.items()} | {"real": real.SOPInstanceUID}
    orthanc.stop()


def cxr_pull(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cxr", "pull", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=os.environ | CREDENTIALS | (env or {}))


def manifest(folder):
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_no_patient_data(folder):
    for path in (folder / "images").rglob("*.dcm"):
        data = path.read_bytes()
        for text in (*NAMES, *IDS, *DATES, "20260120", "20260131", ACCESSIONS, "Saint Example", "Who^Doctor",
                     "private note", "Covid0000"):
            assert text.encode() not in data, (path, text)
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == ds.PatientName == path.parent.name
        assert ds.PatientSex in ("F", "M", "") and not ds.StudyDate and not ds.AccessionNumber
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113108", "113110"]
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_a_query_pulls_exactly_the_matching_instances_over_dimse_and_dicomweb_without_patient_data(pacs, tmp_path):
    orthanc, uids = pacs
    january_dx = {uids["a-january"], uids["b-january"]}
    dimse = f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}"
    for source, folder in ((dimse, tmp_path / "dimse"), (orthanc.dicomweb_url, tmp_path / "dicomweb")):
        result = cxr_pull("--from", source, "--query", "Modality=DX", "--query", "StudyDate=20260101-20260131",
                          "--output-dir", folder)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = manifest(folder)
        # the burned-in January DX matched, and was refused: its pixels may name the patient
        assert {r["sop_instance_uid"] for r in rows} == january_dx, (source, rows)
        assert "1 instance not pulled: its Burned In Annotation is YES" in result.stderr
        assert "3 instances match" in result.stdout and "2 pulled" in result.stdout
        assert len({r["patient_key"] for r in rows}) == 2 and all(r["view"] == "PA" for r in rows)
        assert_no_patient_data(folder)

    # every DX or CR of patient A, over DICOMweb: the same patient has the same key in the same folder
    folder = tmp_path / "dicomweb"
    result = cxr_pull("--from", orthanc.dicomweb_url, "--query", "PatientID=PAT-A", "--output-dir", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["sop_instance_uid"]: r for r in manifest(folder)}
    assert set(rows) == january_dx | {uids["a-january-ap"]} and "1 pulled, 1 already there" in result.stdout
    assert rows[uids["a-january-ap"]]["patient_key"] == rows[uids["a-january"]]["patient_key"]
    assert rows[uids["a-january-ap"]]["view"] == "AP"
    # and the real adult DICOM, by DIMSE with no date (it has none)
    result = cxr_pull("--from", dimse, "--query", "Modality=DX", "--output-dir", tmp_path / "all-dx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["sop_instance_uid"] for r in manifest(tmp_path / "all-dx")} == january_dx | {
        uids["b-february"], uids["real"]}
    assert_no_patient_data(tmp_path / "all-dx")


def test_accession_numbers_from_a_file_and_the_mapping_kept_apart_only_when_asked(pacs, tmp_path):
    orthanc, uids = pacs
    accessions = tmp_path / "accessions.txt"
    accessions.write_text("AccessionNumber\nACC-1\nACC-4\n\nACC-5\n")
    folder, mapping = tmp_path / "cohort", tmp_path / "private" / "mapping.csv"
    mapping.parent.mkdir()
    inside = cxr_pull("--from", orthanc.dicomweb_url, "--accessions", accessions, "--output-dir", folder,
                      "--keep-mapping", folder / "mapping.csv")
    assert inside.returncode == 2 and "keep the mapping outside --output-dir" in inside.stderr
    result = cxr_pull("--from", orthanc.dicomweb_url, "--accessions", accessions, "--output-dir", folder,
                      "--keep-mapping", mapping)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(folder)
    # ACC-5 is a CT: found, and left out
    assert {r["sop_instance_uid"] for r in rows} == {uids["a-january"], uids["b-february"]}
    assert "3 instances match" in result.stdout and "(1 not radiographs: left out)" in result.stdout
    with open(mapping, newline="") as f:
        kept = {r["patient_key"]: r["PatientID"] for r in csv.DictReader(f)}
    assert kept == {r["patient_key"]: ("PAT-A" if r["sop_instance_uid"] == uids["a-january"] else "PAT-B")
                    for r in rows}
    assert oct(mapping.stat().st_mode)[-3:] == "600"
    assert not any("mapping" in p.name for p in folder.rglob("*"))
    assert_no_patient_data(folder)


def test_a_killed_pull_resumes_without_duplicates(pacs, tmp_path):
    orthanc, uids = pacs
    folder = tmp_path / "cohort"
    args = ("--from", orthanc.dicomweb_url, "--query", "Modality=DX", "--output-dir", folder, "--workers", "1")
    child = subprocess.Popen([sys.executable, "-m", "cxr", "pull", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=os.environ | CREDENTIALS)
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if (folder / "manifest.csv").is_file() and len(manifest(folder)) >= 1:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    child.communicate(timeout=60)
    # what a kill can leave, whenever it came: a row cut off mid-line and a temporary image file
    with open(folder / "manifest.csv", "a") as f:
        f.write(f"{uids['b-february']},P0123")
    partial = folder / "images" / "P0123" / ".I0.partial.dcm"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\0" * 10)
    result = cxr_pull(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(folder)
    expected = {uids["a-january"], uids["b-january"], uids["b-february"], uids["real"]}
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(expected)  # each once
    assert not partial.exists()
    assert sorted(p.relative_to(folder).as_posix() for p in (folder / "images").rglob("*.dcm")) == sorted(
        r["path"] for r in rows)
    again = cxr_pull(*args)
    assert again.returncode == 0 and "0 pulled, 4 already there" in again.stdout


@pytest.mark.parametrize("source, extra, env, message", [
    ("ORTHANC@127.0.0.1:{nobody}", (), {}, "ORTHANC@127.0.0.1:{nobody} did not answer, or dropped the association; "
                                            "check its AE title"),
    ("NOTORTHANC@127.0.0.1:{dimse}", (), {}, "NOTORTHANC@127.0.0.1:{dimse} rejected the association"),
    ("{dicomweb}", (), {"CXR_DICOMWEB_PASSWORD": "wrong"}, "QIDO-RS answered HTTP 401; check the credentials"),
    ("http://127.0.0.1:{nobody}/dicom-web", (), {}, "the DICOMweb service did not answer"),
    ("{dicomweb}", ("--query", "Modalty=DX"), {}, "--query 'Modalty=DX': give KEY=VALUE with a DICOM keyword"),
    ("ORTHANC@host", (), {}, "--from 'ORTHANC@host': give the PACS as AE@HOST:PORT"),
])
def test_a_pacs_that_refuses_or_is_not_there_is_one_line(pacs, tmp_path, source, extra, env, message):
    orthanc, _ = pacs
    nobody = free_port()
    source = source.format(nobody=nobody, dicomweb=orthanc.dicomweb_url, dimse=orthanc.dicom_port)
    result = cxr_pull("--from", source, "--output-dir", tmp_path / "cohort", *(extra or ("--query", "Modality=DX")),
                      env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(nobody=nobody, dimse=orthanc.dicom_port) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_pulled_cohort_is_evaluated_with_labels_keyed_by_sop_instance_uid_or_accession_number(
        pacs, tiny_multilabel, tmp_path):
    import json

    orthanc, uids = pacs
    folder = tmp_path / "cohort"
    pulled = cxr_pull("--from", orthanc.dicomweb_url, "--query", "Modality=DX", "--output-dir", folder)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    model = tiny_multilabel[0] / "models" / "model.h5"
    by_uid = tmp_path / "by-uid.csv"
    by_uid.write_text("SOPInstanceUID,Atelectasis,Effusion\n"
                      f"{uids['a-january']},1,0\n{uids['b-january']},0,1\n{uids['b-february']},1,1\n{uids['real']},0,0\n"
                      f"{uids['b-january-ct']},1,0\n")  # the CT was left out of the cohort
    by_accession = tmp_path / "by-accession.csv"
    by_accession.write_text("accession_number,Atelectasis,Effusion\nACC-1,1,0\nACC-3,0,1\nACC-4,1,1\n")
    warnings = {}
    for labels, count in ((by_uid, 4), (by_accession, 3)):
        result = subprocess.run([sys.executable, "-m", "cxr", "evaluate", "--model", str(model), "--labels",
                                 str(labels), "--images", str(folder), "--output-dir", str(tmp_path / labels.stem),
                                 "--bootstrap", "20"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((tmp_path / labels.stem / "reports" / "summary.json").read_text())
        assert summary["counts"]["evaluated"]["images"] == count, summary["counts"]
        warnings[labels] = result.stderr
    assert f"{by_uid}: 1 row names no image in {folder}/manifest.csv" in warnings[by_uid]
    assert "names no image" not in warnings[by_accession]


def test_a_bearer_token_from_the_environment_goes_to_the_dicomweb_service_and_a_refusal_says_so(monkeypatch):
    """Orthanc has no bearer tokens: a real HTTP server on loopback records what cxr sends, and refuses it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cxr.commands.nodes import DicomWebService

    seen = []

    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.headers["Content-Length"]:
                self.rfile.read(int(self.headers["Content-Length"]))
            else:  # chunked
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    self.rfile.read(size + 2)
                self.rfile.readline()
            seen.append((self.path, self.headers["Authorization"], self.headers["Content-Type"]))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CXR_DICOMWEB_TOKEN", "a-token")
        monkeypatch.setenv("CXR_DICOMWEB_USER", "ignored-when-a-token-is-given")
        service = DicomWebService(f"http://127.0.0.1:{server.server_port}/dicom-web")
        ds = pydicom.dcmread(REAL_DICOM)
        failure = service.store([ds])
    finally:
        server.shutdown()
    assert failure.startswith("STOW-RS answered HTTP 401 (check the credentials")
    assert seen == [("/dicom-web/studies", "Bearer a-token", seen[0][2])]
    assert seen[0][2].startswith("multipart/related") and 'type="application/dicom"' in seen[0][2]
