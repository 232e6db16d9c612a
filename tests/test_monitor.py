"""Watching a deployed model: the prediction log (`--monitor-db`, real SQLite), the reference saved with the
model, `cxr monitor`'s windows and alerts, and the log's failures never failing an answer."""

import csv
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from cxr.cli import main
from tests.conftest import NIH_IMAGES
from tests.test_dicom import grey_xray, write_dicom
from tests.test_serve import Server


def held_out(run, split="test"):
    with open(run / "outputs/reports/splits.csv") as f:
        return [row for row in csv.DictReader(f) if row["split"] == split]


def rows_of(db):
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute("SELECT * FROM predictions ORDER BY id")]


@pytest.fixture(scope="module")
def logged(kermany_run, tmp_path_factory):
    """A prediction log of `cxr predict` on the Kermany model's own test images, then 36 adult NIH X-rays, then a
    built DICOM that names its patient; and `cxr monitor`'s answer on it in windows of that many images."""
    root = tmp_path_factory.mktemp("monitor")
    model = kermany_run / "outputs/models/model.h5"
    test = [row["path"] for row in held_out(kermany_run)]
    adults = sorted(NIH_IMAGES.iterdir())[:len(test)]
    dicom = root / "scans" / "Doe_Jane_1980.dcm"
    write_dicom(dicom, grey_xray(), PatientSex="F", PatientAge="044Y", ViewPosition="PA", Manufacturer="Acme",
                StudyDate="20261201", AccessionNumber="ACC-778899")
    db = root / "log.sqlite"
    for images in (test, adults, [dicom]):
        assert main(["predict", *map(str, images), "--model", str(model), "--format", "csv", "--monitor-db",
                     str(db)]) == 0
    code = main(["monitor", "--db", str(db), "--model", str(model), "--output-dir", str(root / "report"),
                 "--window", str(len(test)), "--fail-on-alert"])
    return {"root": root, "db": db, "model": model, "test": test, "adults": adults, "dicom": dicom, "code": code,
            "result": json.loads((root / "report/monitor.json").read_text())}


def test_every_answer_is_logged_with_its_inputs_and_nothing_that_names_a_patient(logged, kermany_run):
    rows = rows_of(logged["db"])
    assert len(rows) == len(logged["test"]) + len(logged["adults"]) + 1
    info = json.loads((kermany_run / "outputs/models/class_names.json").read_text())
    assert {r["model_sha256"] for r in rows} == {info["model_sha256"]} and {r["command"] for r in rows} == {"predict"}
    first = rows[0]
    probabilities = json.loads(first["probabilities"])
    assert set(probabilities) == {"NORMAL", "PNEUMONIA"} and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert json.loads(first["calls"]) == [first["label"]] and first["width"] > 0 and first["format"]
    assert first["in_distribution"] in (0, 1) and first["latency_ms"] > 0
    dicom = rows[-1]
    assert (dicom["format"], dicom["modality"], dicom["view"], dicom["sex"], dicom["age_band"]) == (
        "DICOM", "DX", "PA", "F", "40-59")
    assert len({r["image_key"] for r in rows}) == len(rows)
    # the whole database file, read back: no patient name, ID, date, accession number or file name in it
    stored = b"".join(p.read_bytes() for p in logged["db"].parent.glob("log.sqlite*"))
    assert dicom["manufacturer"] == "Acme"  # the device is an input property worth watching, the patient is not
    for secret in ("Doe", "Jane", "PAT-0001", "19800101", "20261201", "ACC-778899",
                   *(p.split("/")[-1] for p in logged["test"][:5])):
        assert secret.encode() not in stored, secret


def test_the_monitor_alerts_on_adults_and_not_on_the_training_hospitals_own_images(logged):
    result = logged["result"]
    own, adults = result["windows"][0], result["windows"][1]
    assert own["n"] == adults["n"] == len(logged["test"])
    assert own["alerts"] == [] and own["flagged"]["share"] <= 0.1
    assert adults["flagged"]["share"] >= 0.5  # 0.7 at 2026-12-07: a 240-image model flags adults less surely
    assert "flagged" in [a["signal"] for a in adults["alerts"]]
    # too few answers to judge score drift, and said so rather than alerting
    assert "not judged on fewer than 200" in own["judged"]
    # the last window (the one DICOM) is too small to judge at all: no alert, so --fail-on-alert exits 0
    assert result["windows"][-1]["n"] == 1 and result["alerts"] == [] and logged["code"] == 0
    page = (logged["root"] / "report/monitor.html").read_text()
    assert "Alerts in the latest window" in page and "data:image/png;base64," in page


def test_fail_on_alert_exits_1_when_the_latest_window_alerts(logged, capsys):
    since = rows_of(logged["db"])[len(logged["test"])]["time"]  # the adults and the DICOM
    code = main(["monitor", "--db", str(logged["db"]), "--model", str(logged["model"]), "--output-dir",
                 str(logged["root"] / "adults"), "--since", since.replace(" ", "T"), "--fail-on-alert"])
    assert code == 1 and "ALERT flagged" in capsys.readouterr().out
    raised = [f"--threshold={t}" for t in ("flagged=1", "flagged_factor=1000", "call_rate_gap=1", "input_mix=1", "psi=100")]
    assert main(["monitor", "--db", str(logged["db"]), "--model", str(logged["model"]), "--output-dir",
                 str(logged["root"] / "raised"), "--since", since.replace(" ", "T"), "--fail-on-alert", *raised]) == 0
    assert json.loads((logged["root"] / "raised/monitor.json").read_text())["thresholds"]["flagged_factor"] == 1000


def test_confirmed_labels_give_the_realized_numbers_cxr_evaluate_gives(logged, kermany_run, tmp_path, capsys):
    labels = tmp_path / "confirmed.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((row["path"], row["class"]) for row in held_out(kermany_run))
    assert main(["monitor", "--db", str(logged["db"]), "--model", str(logged["model"]), "--output-dir",
                 str(tmp_path / "m"), "--window", str(len(logged["test"])), "--labels", str(labels)]) == 0
    realized = json.loads((tmp_path / "m/monitor.json").read_text())["windows"][0]["realized"]
    assert main(["evaluate", "--model", str(logged["model"]), "--splits",
                 str(kermany_run / "outputs/reports/splits.csv"), "--output-dir", str(tmp_path / "e"),
                 "--bootstrap", "0"]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "e/reports/summary.json").read_text())["metrics"]
    assert realized["n"] == len(logged["test"])
    for name in ("sensitivity", "specificity"):
        assert realized["PNEUMONIA"][name]["value"] == pytest.approx(metrics[name], abs=1e-9), name
    assert realized["PNEUMONIA"]["auc_roc"] == pytest.approx(metrics["auc_roc"], abs=1e-6)


def test_a_database_that_goes_away_costs_rows_never_answers(kermany_run, tmp_path, capsys):
    from cxr.monitor.log import PredictionLog

    db = tmp_path / "log.sqlite"
    PredictionLog(db, "predict").close()
    with sqlite3.connect(db) as connection:  # from now on SQLite refuses every row, as a full disk would
        connection.execute("CREATE TRIGGER full BEFORE INSERT ON predictions BEGIN "
                            "SELECT RAISE(ABORT, 'database or disk is full'); END")
    model = kermany_run / "outputs/models/model.h5"
    images = [row["path"] for row in held_out(kermany_run)][:4]
    assert main(["predict", *images, "--model", str(model), "--format", "json", "--monitor-db", str(db)]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 4  # every answer went out
    assert "the prediction log lost" in err and "database or disk is full" in err
    assert err.count("prediction log lost") == 1  # once per kind of error, not once per row


def test_a_served_answer_is_logged_under_the_id_its_client_sent(kermany_run, tmp_path):
    from cxr.monitor.log import image_key, open_database

    db = tmp_path / "served.sqlite"
    server = Server(kermany_run / "outputs/models/model.h5", "--monitor-db", str(db))
    try:
        image = held_out(kermany_run)[0]["path"]
        with open(image, "rb") as f:
            answer = requests.post(server.url + "/v1/predict", files=[("files", ("x.jpeg", f.read(), "image/jpeg"))],
                                   data={"image_id": "RIS-12345"}, timeout=60)
        assert answer.status_code == 200, answer.text
        refused = requests.post(server.url + "/v1/predict", files=[("files", ("n.txt", b"not an image", "text/plain"))],
                                timeout=60)
        assert refused.status_code == 415
        scraped = requests.get(server.url + "/metrics", timeout=10).text
        called = answer.json()["predictions"][0]["label"]
        for line in ('cxr_requests_total{status="200"} 1.0', 'cxr_requests_total{status="415"} 1.0',
                     'cxr_images_total{status="200"} 1.0', 'cxr_images_total{status="415"} 1.0',
                     f'cxr_calls_total{{name="{called}"}} 1.0', "cxr_request_seconds_count 2.0",
                     "cxr_monitor_rows_failed 0.0"):
            assert line in scraped, (line, scraped)
    finally:
        server.stop()  # the log is written out as the server stops
    rows = rows_of(db)
    _, salt = open_database(db)
    assert len(rows) == 1 and rows[0]["command"] == "serve"
    assert rows[0]["image_key"] == image_key(salt, "id", "RIS-12345") and b"RIS-12345" not in db.read_bytes()
    logged = json.loads(rows[0]["probabilities"])  # kept to 6 decimals
    assert logged == pytest.approx(answer.json()["predictions"][0]["probabilities"], abs=1e-6)


def test_a_model_saved_without_a_reference_says_what_to_do(tiny_run, tmp_path, capsys):
    from cxr.monitor.log import PredictionLog

    log = PredictionLog(tmp_path / "log.sqlite", "predict")
    log.close()
    model = tmp_path / "old"
    model.mkdir()
    for f in (tiny_run / "models").iterdir():
        if f.name != "reference.npz" and f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    assert main(["monitor", "--db", str(tmp_path / "log.sqlite"), "--model", str(model / "model.h5"),
                 "--output-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "reference.npz: not found" in err and "--reference-data" in err and len(err.strip().splitlines()) == 1


def test_psi_is_zero_for_the_reference_itself_and_large_for_a_shifted_stream():
    from cxr.monitor.drift import psi

    rng = np.random.default_rng(0)
    reference = rng.beta(2, 5, 2000)
    assert psi(reference, reference) == pytest.approx(0, abs=1e-9)
    assert psi(reference, rng.beta(2, 5, 2000)) < 0.05
    assert psi(reference, rng.beta(5, 2, 500)) > 1


def test_windows_of_days_start_where_the_answers_are():
    import datetime

    from cxr.commands.monitor import MonitorOptions, cut

    day = datetime.datetime(2026, 12, 1, 8, tzinfo=datetime.timezone.utc)
    times = [day, day + datetime.timedelta(hours=30), day + datetime.timedelta(days=9), day + datetime.timedelta(days=9.5)]
    windows = list(cut([{"time": t} for t in times], MonitorOptions(window_days=7)))
    assert [[r["time"] for r in w] for w in windows] == [times[:2], times[2:]]  # days 0-6, then days 7-13
    assert [len(w) for w in cut([{"time": t} for t in times], MonitorOptions(window=3))] == [3, 1]


@pytest.fixture
def postgres():
    """A real PostgreSQL of its own (tests/postgres.py), removed afterwards; skipped without Debian's postgresql
    (CI installs it, and fails instead)."""
    from tests.postgres import Postgres, postgres_bin

    if postgres_bin() is None:
        if os.environ.get("CXR_REQUIRE_SERVICES"):
            pytest.fail("PostgreSQL is not installed (CI installs the Debian package postgresql)")
        pytest.skip("PostgreSQL is not installed")
    database = Postgres()
    yield database
    database.remove()


def post(server, path, **data):
    with open(path, "rb") as f:
        answer = requests.post(server.url + "/v1/predict", files=[("files", (Path(path).name, f.read()))], data=data,
                               timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"][0]


def scraped(server, name):
    text = requests.get(server.url + "/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_two_servers_on_one_postgres_lose_no_row_and_the_monitor_alerts_on_adults(kermany_run, postgres, tmp_path):
    """Two `cxr serve` replicas log to one real PostgreSQL at once: the model's own test images, then adults,
    then a DICOM that names its patient; `cxr monitor` reads the database: no alert on the own images, an alert
    on the adults; nothing that names the patient is stored."""
    from sqlalchemy import create_engine, text

    model = kermany_run / "outputs/models/model.h5"
    test = [row["path"] for row in held_out(kermany_run)]
    adults = sorted(NIH_IMAGES.iterdir())[:len(test)]
    dicom = tmp_path / "Doe_Jane_1980.dcm"
    write_dicom(dicom, grey_xray(), PatientSex="F", PatientAge="044Y", StudyDate="20261201",
                AccessionNumber="ACC-778899")
    servers = [Server(model, "--monitor-db", postgres.url) for _ in range(2)]
    try:
        for images in (test, adults):  # the two replicas answer at once, half of the images each
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda k: [post(servers[k], p) for p in images[k::2]], range(2)))
        post(servers[0], dicom)
    finally:
        for server in servers:
            server.stop()  # each writes out its queue as it stops
    engine = create_engine(postgres.url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT image_key, command FROM predictions")).all()
        stored = " ".join(str(r) for r in connection.execute(text("SELECT * FROM predictions")).all())
    engine.dispose()
    assert len(rows) == len(test) + len(adults) + 1 and len({key for key, _ in rows}) == len(rows)
    for secret in ("Doe", "Jane", "PAT-0001", "19800101", "20261201", "ACC-778899", dicom.name):
        assert secret not in stored, secret
    assert main(["monitor", "--db", postgres.url, "--model", str(model), "--output-dir", str(tmp_path / "m"),
                 "--window", str(len(test))]) == 0
    own, shifted = json.loads((tmp_path / "m/monitor.json").read_text())["windows"][:2]
    assert own["n"] == shifted["n"] == len(test)
    assert own["alerts"] == [] and "flagged" in [a["signal"] for a in shifted["alerts"]]


def logged_rows(url):
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM predictions")).scalar_one()
    engine.dispose()
    return count


def test_postgres_stopped_mid_stream_costs_rows_never_answers(kermany_run, postgres):
    model = kermany_run / "outputs/models/model.h5"
    images = [row["path"] for row in held_out(kermany_run)][:6]
    server = Server(model, "--monitor-db", postgres.url)
    try:
        for image in images[:2]:
            post(server, image)
        for _ in range(120):  # both rows written before the database goes
            if logged_rows(postgres.url) == 2:
                break
            time.sleep(0.5)
        postgres.stop()
        for image in images[2:5]:
            post(server, image)  # answered, with the database gone
        for _ in range(120):  # the writer counts the lost rows as it meets the stopped database
            if scraped(server, "cxr_monitor_rows_failed") == 3:
                break
            time.sleep(0.5)
        assert scraped(server, "cxr_monitor_rows_failed") == 3
        postgres.start()
        post(server, images[5])  # the log writes again once the database is back
    finally:
        err = server.stop()
    assert "the prediction log lost" in err and logged_rows(postgres.url) == 3


def test_the_grafana_dashboard_asks_only_for_metrics_cxr_serves(tmp_path):
    """docs/grafana-cxr.json: every series its queries name is one `cxr serve` or `cxr listen` exports."""
    import re
    from types import SimpleNamespace

    from cxr.commands.listen import Listener, ListenMetrics
    from cxr.commands.serve import ServeMetrics

    log = SimpleNamespace(waiting=0, failed=0, dropped=0)  # what the gauges read of a PredictionLog
    listener = Listener(None, "CXR", None, tmp_path, keep_results=False)
    exported = set()
    for registry in (ServeMetrics(["NORMAL", "PNEUMONIA"], log).registry, ListenMetrics(listener).registry):
        for family in registry.collect():
            exported |= {sample.name for sample in family.samples}
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "docs/grafana-cxr.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    asked = {name for q in queries for name in re.findall(r"\b(cxr_[a-z_]+)", q)}
    assert len(queries) >= 10 and asked and asked <= exported, asked - exported
    assert {"cxr_images_flagged_total", "cxr_monitor_rows_failed", "cxr_listen_results_total"} <= asked
