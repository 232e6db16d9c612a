"""Nothing silently wrong, nothing starved: the faults an external audit found, each reproduced on a tiny real
model and a real server."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from cxr.cli import main

from tests.conftest import SAMPLE, headless_browser
from tests.test_bad_input import decompression_bomb
from tests.test_dicom import grey_xray, write_dicom
from tests.test_serve import Server

XRAY = sorted((SAMPLE / "NORMAL").iterdir())[0]


@pytest.fixture(scope="module")
def server(tiny_run, litert_cache):
    running = Server(tiny_run / "models/model.h5", "--max-upload-mb", "20", cache=litert_cache)
    yield running
    running.stop()


def peak_rss_mb(pid):
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def big_grey_png(path, side=7000):
    """A 16-bit grey PNG of side x side pixels that compresses to little (as an X-ray export's flat borders do)."""
    array = np.full((side, side), 1000, np.uint16)
    array[side // 4: side // 2] = 30000
    Image.fromarray(array).save(path)
    return path


def test_calibrating_on_a_one_class_sample_is_refused(tiny_run, tmp_path, capsys):
    """Fault 1: a NORMAL-only sample gave a copy at temperature 0.05 that called every image NORMAL at p = 1."""
    (tmp_path / "site/NORMAL").mkdir(parents=True)
    for f in sorted((SAMPLE / "NORMAL").iterdir())[:3]:
        shutil.copy2(f, tmp_path / "site/NORMAL" / f.name)
    assert main(["calibrate", "--model", str(tiny_run / "models/model.h5"), "--data-dir", str(tmp_path / "site"),
                 "--output-dir", str(tmp_path / "out"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "no images of PNEUMONIA" in err and "Traceback" not in err
    assert not (tmp_path / "out/models/model.h5").exists()


def test_a_large_16_bit_image_decodes_in_bounded_memory(server, tmp_path):
    """Fault 2: four 7000 x 7000 16-bit PNGs in one request raised the server's peak memory by 4.3-4.6 GB."""
    png = big_grey_png(tmp_path / "big.png")
    before = peak_rss_mb(server.process.pid)
    files = [("files", (f"big{k}.png", png.read_bytes(), "image/png")) for k in range(4)]
    answer = requests.post(server.url + "/v1/predict", files=files, timeout=120)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 4
    assert peak_rss_mb(server.process.pid) - before < 1200


def test_a_fifo_in_a_folder_is_skipped_and_named_directly_is_refused(tiny_run, tmp_path):
    """Fault 3: a FIFO inside a folder hung `cxr predict`; named directly it was 'no such file or folder'."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy2(XRAY, folder / XRAY.name)
    os.mkfifo(folder / "pipe.png")
    command = [sys.executable, "-m", "cxr", "predict", "--model", str(tiny_run / "models/model.h5")]
    result = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and XRAY.name in result.stdout
    assert "pipe.png: not a regular file" in result.stderr
    named = subprocess.run([*command, str(folder / "pipe.png")], capture_output=True, text=True, timeout=300)
    assert named.returncode == 2 and "not a regular file" in named.stderr and "no such file" not in named.stderr


def test_the_cli_gives_every_decode_warning_the_server_gives(server, tiny_run, tmp_path, capsys):
    """Fault 4: a lateral, C-spine, 16 x 16 px DICOM printed a label and nothing else from the CLI."""
    small = grey_xray()[::40, ::40][:16, :16]
    write_dicom(tmp_path / "lateral.dcm", small, ViewPosition="LL", BodyPartExamined="CSPINE")
    write_dicom(tmp_path / "no-modality.dcm", grey_xray(), modality=None)
    served = requests.post(server.url + "/v1/predict", timeout=60, files=[
        ("files", (p.name, p.read_bytes(), "application/dicom"))
        for p in (tmp_path / "lateral.dcm", tmp_path / "no-modality.dcm")]).json()["predictions"]
    model = str(tiny_run / "models/model.h5")
    paths = [str(tmp_path / "lateral.dcm"), str(tmp_path / "no-modality.dcm")]
    assert main(["predict", *paths, "--model", model, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert len(served[0]["warnings"]) == 3
    for record, answer in zip(records, served):
        assert record["warnings"] == answer["warnings"] and record["warnings"]
        for warning in answer["warnings"]:
            assert warning in err
    assert any("no Modality" in w for w in records[1]["warnings"])
    assert main(["predict", *paths, "--model", model, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["warnings"] for row in rows] == ["; ".join(r["warnings"]) for r in records]


def mounted_tmpfs(folder, size):
    """`folder` made a tmpfs of `size` ("1m"), to be a disk that fills up (needs root, as CI runs); a generator
    for a fixture, unmounting it afterwards."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("can't mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB disk: no room for an export."""
    yield from mounted_tmpfs(tmp_path / "disk", "1m")


def test_export_on_a_full_disk_says_so_in_one_line(tiny_run, full_disk, capsys):
    """Fault 5: a TensorFlow traceback (ResourceExhaustedError ... No space left on device), exit 1."""
    assert main(["export", "--model", str(tiny_run / "models/model.h5"), "--format", "savedmodel",
                 "--output-dir", str(full_disk / "export")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "space" in err and str(full_disk / "export") in err and "Traceback" not in err
    assert os.listdir(full_disk / "export") == []  # nothing of it left behind


def test_health_answers_at_once_and_grad_cam_is_bounded_under_an_explain_load(server):
    """Fault 6: with 48 clients on explain=true, /health/live took 6-7 s and explain requests queued without end."""
    statuses, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            answer = requests.post(server.url + "/v1/predict", params={"explain": "true"}, timeout=120,
                                   files=[("files", (XRAY.name, XRAY.read_bytes(), "image/jpeg"))])
            statuses.append((answer.status_code, answer.headers.get("Retry-After")))

    clients = [threading.Thread(target=client) for _ in range(48)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(3)
        latencies = []
        for _ in range(10):
            start = time.monotonic()
            assert requests.get(server.url + "/health/live", timeout=10).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    # The fault took 6-7 s on every probe. The 48 client threads share the 2 cores with the server, so one probe in
    # ten can wait a scheduler slice or a garbage collection (1.4 s seen once): the bound is on the typical probe and
    # a looser one on the worst, both far below the fault.
    assert sorted(latencies)[len(latencies) // 2] < 0.5 and max(latencies) < 3.0
    assert {status for status, _ in statuses} <= {200, 503} and (200, None) in statuses
    assert all(retry for status, retry in statuses if status == 503) and any(s == 503 for s, _ in statuses)


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tiny_run, tmp_path, capsys):
    """Fault 7: a file named =HYPERLINK(...).jpeg became a live formula in `cxr predict --format csv`."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy2(XRAY, folder / '=HYPERLINK("example.org","click").jpeg')
    os.chdir(folder)
    try:
        assert main(["predict", ".", "--model", str(tiny_run / "models/model.h5"), "--format", "csv"]) == 0
    finally:
        os.chdir(tmp_path)
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["path"] == "'=HYPERLINK(\"example.org\",\"click\").jpeg"


def test_a_decompression_bomb_gets_413(server, tmp_path):
    """Fault 8: a PNG whose header claims 20000 x 20000 pixels got 400 where the README documents 413."""
    bomb = decompression_bomb(tmp_path / "bomb.png")
    answer = requests.post(server.url + "/v1/predict", timeout=60,
                           files=[("files", ("bomb.png", bomb.read_bytes(), "image/png"))])
    assert answer.status_code == 413 and "bomb.png" in answer.json()["detail"]


def test_predict_fails_when_nothing_could_be_predicted_and_lists_every_skipped_file(tiny_run, tmp_path, capsys):
    """Fault 11: exit 0 with an empty table when every input was refused, and only three names of the rest."""
    for k in range(5):
        (tmp_path / f"broken{k}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    listed = tmp_path / "skipped.csv"
    assert main(["predict", *(str(tmp_path / f"broken{k}.png") for k in range(5)), "--model",
                 str(tiny_run / "models/model.h5"), "--skipped-list", str(listed)]) == 2
    err = capsys.readouterr().err
    assert "none of the 5 images could be predicted" in err and str(listed) in err
    rows = list(csv.DictReader(listed.open()))
    assert sorted(r["path"] for r in rows) == sorted(str(tmp_path / f"broken{k}.png") for k in range(5))
    assert all(r["reason"] for r in rows)


def test_an_output_folder_that_is_a_file_is_named_as_such(xray_raw, tmp_path, capsys):
    """Fault 10: --output-dir naming a file said 'File exists; check that folder's permissions'."""
    (tmp_path / "taken").write_text("a file")
    assert main(["train", "--data-dir", str(xray_raw), "--output-dir", str(tmp_path / "taken"), "--epochs", "1",
                 "--img-size", "32", "--weights", "none", "--backbone", "test-efficientnet"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "check that folder's permissions" not in err


def test_head_on_the_page_answers(server):
    """Fault 12 (in part): HEAD / gave 405."""
    assert requests.head(server.url + "/", timeout=10).status_code == 200


def test_an_empty_dicom_file_is_called_empty(tiny_run, tmp_path, capsys):
    """Fault 10 (in part): a 0-byte .dcm was 'a DICOM file without an image (no Pixel Data)'."""
    (tmp_path / "empty.dcm").write_bytes(b"")
    shutil.copy2(XRAY, tmp_path / XRAY.name)
    assert main(["predict", str(tmp_path / "empty.dcm"), str(tmp_path / XRAY.name), "--model",
                 str(tiny_run / "models/model.h5")]) == 0
    err = capsys.readouterr().err
    assert "empty.dcm (an empty file (0 bytes))" in err and "Pixel Data" not in err


def test_one_bad_part_of_a_multipart_request_is_answered_on_its_own(server, tmp_path):
    """Fault 12 (in part): an empty part beside a good image gave 415 for both."""
    answer = requests.post(server.url + "/v1/predict", timeout=60, files=[
        ("files", ("empty.png", b"", "image/png")), ("files", (XRAY.name, XRAY.read_bytes(), "image/jpeg"))])
    assert answer.status_code == 200
    refused, predicted = answer.json()["predictions"]
    assert refused["filename"] == "empty.png" and refused["status"] == 415 and refused["detail"]
    assert predicted["filename"] == XRAY.name and predicted["label"] in ("NORMAL", "PNEUMONIA")
    only_bad = requests.post(server.url + "/v1/predict", timeout=60, files=[("files", ("empty.png", b"", "image/png"))])
    assert only_bad.status_code == 415


def test_a_dicom_file_without_its_preamble_is_read_by_the_server_as_by_the_cli(server, tiny_run, tmp_path, capsys):
    """Fault 12 (in part): DICOM files without the 128-byte preamble got 415 from the server; the CLI reads them."""
    write_dicom(tmp_path / "full.dcm", grey_xray())
    bare = tmp_path / "bare.dcm"
    bare.write_bytes((tmp_path / "full.dcm").read_bytes()[132:])  # no preamble, no 'DICM': the data set alone
    answer = requests.post(server.url + "/v1/predict", timeout=60,
                           files=[("files", ("bare", bare.read_bytes(), "application/octet-stream"))])
    assert answer.status_code == 200, answer.text
    assert main(["predict", str(bare), "--model", str(tiny_run / "models/model.h5"), "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)[0]
    assert answer.json()["predictions"][0]["probabilities"]["PNEUMONIA"] == pytest.approx(expected["p_PNEUMONIA"],
                                                                                          abs=1e-6)


def test_the_openapi_spec_is_true_to_the_server(server, tmp_path):
    """Fault 9: schemathesis found a 422 whose `detail` the spec said was an array (the server sends a string),
    and 400, 413, 415 and 503 undocumented. Bounded examples, against the real server on loopback. Left out:
    the check that every schema-valid body is accepted, since random bytes fit "a binary file" but are no image
    (the server answers 415, as documented)."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run([str(schemathesis), "run", server.url + "/openapi.json", "--checks", "all",
                             "--exclude-checks", "positive_data_acceptance", "--max-examples", "10",
                             "--generation-deterministic", "--request-timeout", "60"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its .schemathesis/ there
    assert result.returncode == 0, result.stdout[-4000:]


def test_the_api_docs_load_offline_in_chromium(server, tmp_path):
    """Fault 12 (in part): /docs loaded Swagger UI from a CDN, so it was blank offline."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = requests.get(server.url + "/docs", timeout=10).text
    assert "/static/swagger/swagger-ui-bundle.js" in page and "://" not in page.replace(server.url, "")
    browser = headless_browser(tmp_path)
    try:
        browser.get(server.url + "/docs")
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert "/v1/predict" in paths and "cxr" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    finally:
        browser.quit()


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB disk: room for a tiny run's caches and logs, not for a Lite0 checkpoint."""
    yield from mounted_tmpfs(tmp_path / "small", "6m")


def test_training_on_a_full_disk_leaves_no_corrupt_checkpoint(xray_raw, small_disk):
    """Fault 10 (in part): a full disk left models/.staging/best_*.keras as a corrupt zip, while the message said
    nothing was left half-written."""
    result = subprocess.run([sys.executable, "-m", "cxr", "train", "--data-dir", str(xray_raw), "--output-dir",
                             str(small_disk / "out"), "--img-size", "32", "--epochs", "1", "--batch-size", "8",
                             "--backbone", "efficientnet-lite0", "--weights", "none", "--bootstrap", "0"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "space" in result.stderr and "nothing was left half-written" not in result.stderr
    assert list((small_disk / "out/models").rglob("*.keras")) == []


def test_a_body_shorter_than_its_content_length_is_answered_and_logged_in_one_line(tiny_run):
    """Fault 10 (in part): a request body shorter than its Content-Length was answered with a detail showing a
    Python object; its log line then failed on the disconnect's empty message."""
    import socket

    running = Server(tiny_run / "models/model.h5")
    try:
        host, port = running.url.removeprefix("http://").split(":")
        for content_type, body in (("image/jpeg", b"\xff\xd8\xffxxxx"),
                                   ("multipart/form-data; boundary=XX",
                                    b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n\xff')):
            with socket.create_connection((host, int(port))) as client:
                client.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
                               "Content-Length: 1000\r\n\r\n".encode() + body)
                client.shutdown(socket.SHUT_WR)
                client.settimeout(30)
                answer = client.recv(4000)
            assert b"object at 0x" not in answer
        assert requests.get(running.url + "/health/live", timeout=10).status_code == 200
    finally:
        log = running.stop()
    assert "Traceback" not in log and "object at 0x" not in log
    assert log.count("the client disconnected before sending the whole request") == 2
