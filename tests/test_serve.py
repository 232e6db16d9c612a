"""`cxr serve` as a real server process on a free loopback port: the API against `cxr predict`, every error
status, the API key, and the page in headless Chromium."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from PIL import Image

from cxr.cli import main
from tests.conftest import SAMPLE, headless_browser

XRAYS = sorted((SAMPLE / "NORMAL").iterdir())[:2] + sorted((SAMPLE / "PNEUMONIA").iterdir())[:2]
MAX_UPLOAD_MB = 1


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`cxr serve` in a subprocess; `url`, and the text it wrote to stderr once stopped. Its LiteRT cache is the
    suite's (conftest's isolated_run sets it for a test; a module's fixture, which runs before that, names it as
    `cache`), where the session's models are converted once, not once per server."""

    def __init__(self, model, *options, cache=None):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cxr", "serve", "--model", str(model), "--port", port, *options],
            stderr=subprocess.PIPE, text=True, env=os.environ | ({"XDG_CACHE_HOME": str(cache)} if cache else {}))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()[-3000:]
            try:
                if requests.get(self.url + "/health/ready", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
                pass
            time.sleep(0.5)
        raise AssertionError("the server did not get ready in 180 s")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        return self.process.stderr.read()


@pytest.fixture(scope="module")
def server(tiny_run, litert_cache):
    running = Server(tiny_run / "models/model.h5", "--max-upload-mb", str(MAX_UPLOAD_MB), cache=litert_cache)
    yield running
    running.stop()


def predict(server, files, **params):
    upload = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    return requests.post(server.url + "/v1/predict", files=upload, params=params, timeout=60)


def test_predictions_on_real_xrays_equal_cxr_predict(server, tiny_run, capsys):
    answer = predict(server, XRAYS)
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]
    assert main(["predict", *map(str, XRAYS), "--model", str(tiny_run / "models/model.h5"), "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    info = json.loads((tiny_run / "models/class_names.json").read_text())
    assert [p["filename"] for p in served] == [f.name for f in XRAYS]
    for got, want in zip(served, expected):
        assert got["label"] == want["label"]
        for name in info["class_names"]:
            assert got["probabilities"][name] == pytest.approx(want[f"p_{name}"], abs=1e-6)
        assert got["threshold"] == info["threshold"] and got["model_sha256"] == info["model_sha256"]
        assert got["positive_class"] == info["positive_class"] and "threshold" in got["decision_rule"]

    raw = requests.post(server.url + "/v1/predict", data=XRAYS[0].read_bytes(),
                        headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert raw.status_code == 200
    assert raw.json()["predictions"][0]["probabilities"] == served[0]["probabilities"]


def test_model_endpoint_describes_the_model_and_its_training(server, tiny_run):
    card = requests.get(server.url + "/v1/model", timeout=10).json()
    info = json.loads((tiny_run / "models/class_names.json").read_text())
    summary = json.loads((tiny_run / "reports/summary.json").read_text())
    assert card["class_names"] == info["class_names"] and card["img_size"] == 32
    assert card["model_sha256"] == info["model_sha256"] and card["backbone"] == "test-efficientnet"
    point = card["operating_point"]
    assert point["threshold"] == info["threshold"] and point["temperature"] == info["temperature"]
    assert "validation split" in point["fitted_on_description"]
    # the folders it was fitted on by name: no path on the server leaves it
    assert str(tiny_run.parent) not in json.dumps(card) and point["fitted_on"]["data_dir"] == "data"
    assert card["training"]["counts"] == summary["counts"]
    assert card["training"]["metrics"]["sensitivity"] == summary["metrics"]["sensitivity"]
    assert card["training"]["confidence_intervals"]["sensitivity"] == summary["confidence_intervals"]["sensitivity"]
    assert card["training"]["cautions"] == summary["cautions"] and summary["cautions"]  # 14 images per class
    assert card["versions"]["cxr"] and card["versions"]["tensorflow"] and card["engine"] == "litert"
    assert any("substitute" in limit for limit in card["limits"])
    assert card["population_check"]["available"] and card["population_check"]["threshold"] > 0
    assert card["population_check"]["layers"][-1] == "avg_pool"
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200
    assert "/v1/predict" in requests.get(server.url + "/openapi.json", timeout=10).json()["paths"]


def test_overlay_and_warnings(server):
    overlay = predict(server, XRAYS[:1], explain="true").json()["predictions"][0]["overlay"]
    assert overlay.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(overlay.split(",", 1)[1]))) as picture:
        assert picture.size == (512, 512) and picture.mode == "RGB"

    with Image.open(XRAYS[0]) as xray:
        pixels = np.asarray(xray.convert("RGB")).copy()
    pixels[..., 0] = np.clip(pixels[..., 0].astype(int) + 60, 0, 255)  # a red tint: a photo, not an X-ray
    tinted, small = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(tinted, "PNG")
    Image.fromarray(pixels[:20, :20, 1]).save(small, "PNG")
    answer = requests.post(server.url + "/v1/predict", timeout=60, files=[
        ("files", ("tinted.png", tinted.getvalue(), "image/png")), ("files", ("small.png", small.getvalue(), "image/png"))])
    tinted_warnings, small_warnings = (p["warnings"] for p in answer.json()["predictions"])
    assert any("colour" in w for w in tinted_warnings)
    assert any("very small" in w for w in small_warnings) and not any("colour" in w for w in small_warnings)
    assert predict(server, XRAYS[:1]).json()["predictions"][0]["warnings"] == []


def truncated_jpeg():
    return XRAYS[0].read_bytes()[:600]


def bomb_png():
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")  # 81 megapixels in a few kilobytes
    return buffer.getvalue()


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"files": [("files", ("cut.jpeg", truncated_jpeg(), "image/jpeg"))]}, 400, "cut.jpeg"),
    ({"data": b"name,age\nx,3\n", "headers": {"Content-Type": "image/png"}}, 415, "not a JPEG, PNG, BMP or DICOM"),
    ({"files": [("files", ("notes.txt", b"hello", "text/plain"))]}, 415, "notes.txt"),
    ({"files": [("files", ("bomb.png", bomb_png(), "image/png"))]}, 413, "pixels"),
    ({"data": os.urandom(MAX_UPLOAD_MB * 2 ** 20 + 1), "headers": {"Content-Type": "image/png"}}, 413, "limit"),
    ({"data": iter([os.urandom(2 ** 16)] * (16 * MAX_UPLOAD_MB + 1)), "headers": {"Content-Type": "image/png"}},
     413, "limit"),  # chunked: no Content-Length to check first
    ({"params": {"explain": "maybe"}, "files": [("files", ("x.jpeg", b"\xff\xd8\xff", "image/jpeg"))]}, 422, "explain"),
    ({"data": b""}, 422, "no image"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_answering(server, request_kwargs, status, words):
    answer = requests.post(server.url + "/v1/predict", timeout=60, **request_kwargs)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "detail"} and words in body["detail"]
    assert predict(server, XRAYS[:1]).status_code == 200


def test_an_oversized_body_is_refused_before_it_is_sent(server):
    """The 413 comes back after the headers alone: the server never waits for the 100 MB they announce."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 104857600\r\n\r\n" + b"\x89PNG" + bytes(1000))
        reply = b""
        try:  # the headers and the body can come in separate segments
            while b"--max-upload-mb" not in reply and (chunk := connection.recv(4096)):
                reply += chunk
        except ConnectionResetError:  # closed with the announced body unread: what came before still counts
            pass
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413") and "too_large" in reply and "--max-upload-mb" in reply


def test_api_key_guards_the_api_but_not_the_health_checks(tiny_run):
    guarded = Server(tiny_run / "models/model.h5", "--api-key", "s3cret")
    try:
        assert requests.get(guarded.url + "/health/live", timeout=10).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = requests.get(guarded.url + "/v1/model", headers=headers, timeout=10)
            assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        upload = [("files", (XRAYS[0].name, XRAYS[0].read_bytes(), "image/jpeg"))]
        assert requests.post(guarded.url + "/v1/predict", files=upload, timeout=60).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert requests.get(guarded.url + "/v1/model", headers=good, timeout=10).status_code == 200
        assert requests.post(guarded.url + "/v1/predict", files=upload, headers=good, timeout=60).status_code == 200
    finally:
        log = guarded.stop()
    assert "s3cret" not in log


def test_predict_answers_503_until_the_model_is_loaded(tiny_run):
    """Before the lifespan starts the model's thread, the app is as it is while a model still loads."""
    from fastapi.testclient import TestClient

    from cxr.bundle.saved_model import SavedModel
    from cxr.commands.serve import create_app

    client = TestClient(create_app(SavedModel.load(tiny_run / "models/model.h5")),  # no `with`: no lifespan
                        base_url="http://localhost")  # a host the app answers to
    for answer in (client.get("/health/ready"), client.post("/v1/predict", content=XRAYS[0].read_bytes())):
        assert answer.status_code == 503 and answer.json()["error"] == "service_unavailable"
    assert client.get("/health/live").status_code == 200


def test_serve_mistakes_are_one_line_errors(tiny_run, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing.h5")]) == 2
    assert "no such model file" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(tiny_run / "models/model.h5"), "--port", port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    with socket.socket() as taken:  # beyond loopback: a warning first (the taken port then stops it)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(tiny_run / "models/model.h5"), "--host", "0.0.0.0", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "anyone who can reach this machine" in err and "--api-key" in err


def test_the_page_shows_the_apis_answer_and_the_overlay_in_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = headless_browser(tmp_path)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(
            lambda b: "Limits of use" in b.find_element(By.ID, "card").get_attribute("textContent"))
        # the tiny model's test metrics rest on a handful of images, and the page says so beside them
        cautions = browser.find_elements(By.CSS_SELECTOR, "#card .caution")
        assert cautions and all(c.text.startswith("Caution: ") for c in cautions)
        browser.find_element(By.ID, "files").send_keys(str(XRAYS[2]))
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result"))
        expected = predict(server, [XRAYS[2]]).json()["predictions"][0]
        positive = expected["positive_class"]
        shown_label = browser.find_element(By.CSS_SELECTOR, ".result .label")
        shown_probability = browser.find_element(By.CSS_SELECTOR, ".result .prob")
        assert shown_label.text == expected["label"]
        assert float(shown_probability.get_attribute("data-probability")) == expected["probabilities"][positive]
        assert f"{expected['probabilities'][positive]:.3f}" in shown_probability.text
        image = browser.find_element(By.CSS_SELECTOR, ".result img")
        assert image.get_attribute("src").startswith("blob:")
        browser.find_element(By.CSS_SELECTOR, ".overlay-toggle").click()
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        WebDriverWait(browser, 10).until(lambda b: b.execute_script("return arguments[0].complete", image))
        assert bool(browser.find_elements(By.CSS_SELECTOR, ".result .population-notice")) == (
            expected["in_distribution"] is False)
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert "Classifying" not in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()
    with Image.open(shot) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    assert (pixels.max(axis=-1) - pixels.min(axis=-1) > 80).mean() > 0.01  # the coloured heatmap is on screen


def test_the_page_puts_the_population_notice_above_a_flagged_photos_label(kermany_run, tmp_path):
    """A photo is not an X-ray: the notice stands above its label. On the Kermany model, whose features are
    ImageNet's (test_population: it flags photos); a tiny model from random weights flags them or not by chance."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "photo.png")
    server = Server(kermany_run / "outputs/models/model.h5")
    browser = headless_browser(tmp_path)
    try:
        assert predict(server, [tmp_path / "photo.png"]).json()["predictions"][0]["in_distribution"] is False
        browser.get(server.url + "/")
        browser.find_element(By.ID, "files").send_keys(str(tmp_path / "photo.png"))
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result[data-filename='photo.png']"))
        result = browser.find_element(By.CSS_SELECTOR, ".result[data-filename='photo.png']")
        notice = result.find_element(By.CSS_SELECTOR, ".population-notice")
        assert "not reliable" in notice.text
        assert notice.location["y"] < result.find_element(By.CSS_SELECTOR, ".label").location["y"]
        browser.save_screenshot(str(tmp_path / "flagged.png"))
    finally:
        browser.quit()
        server.stop()


def test_dicom_uploads_are_read_like_cxr_predict_reads_them(server, tiny_run, tmp_path, capsys):
    from tests.test_dicom import grey_xray, write_dicom

    stored = grey_xray(XRAYS[2]).astype(np.uint16) * 16
    write_dicom(tmp_path / "IM0001", stored, bits=12, WindowCenter=2000, WindowWidth=3000)  # no extension
    answer = requests.post(server.url + "/v1/predict", data=(tmp_path / "IM0001").read_bytes(),
                           headers={"Content-Type": "application/dicom"}, params={"explain": "true"}, timeout=60)
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"][0]
    assert served["image"].startswith("data:image/png;base64,") and served["overlay"].startswith("data:image/png")
    assert main(["predict", str(tmp_path / "IM0001"), "--model", str(tiny_run / "models/model.h5"), "--format", "json"]) == 0
    (expected,) = json.loads(capsys.readouterr().out)
    assert served["label"] == expected["label"]
    assert served["probabilities"]["PNEUMONIA"] == pytest.approx(expected["p_PNEUMONIA"], abs=1e-6)

    write_dicom(tmp_path / "ct.dcm", grey_xray(XRAYS[2]), modality="CT")
    refused = requests.post(server.url + "/v1/predict", timeout=60,
                            files=[("files", ("ct.dcm", (tmp_path / "ct.dcm").read_bytes(), "application/dicom"))])
    assert refused.status_code == 422 and "a CT image" in refused.json()["detail"]
    assert "PAT-0001" not in refused.text and "Doe" not in refused.text


def test_a_foreign_host_header_is_refused_and_every_answer_carries_security_headers(server):
    """Audit 2026-12-06, fault 15: any Host header was answered (a web page could read /v1/model through DNS
    rebinding), and no X-Frame-Options, Content-Security-Policy or nosniff header was sent."""
    rebound = requests.get(server.url + "/v1/model", headers={"Host": "attacker.example:80"}, timeout=30)
    assert rebound.status_code == 400 and "attacker.example" in rebound.json()["detail"]
    for path in ("/", "/v1/model", "/docs"):
        answer = requests.get(server.url + path, timeout=30)
        assert answer.status_code == 200 and answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    for host in ("localhost", f"[::1]:{server.url.rsplit(':', 1)[1]}"):
        assert requests.get(server.url + "/health/live", headers={"Host": host}, timeout=30).status_code == 200
