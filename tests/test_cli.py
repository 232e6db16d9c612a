"""The commands end to end on tiny real data, and every user mistake as a one-line error with exit code 2."""

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr.cli import main
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--epochs", "1", "--batch-size", "8", "--backbone", "efficientnet-lite0",
        "--weights", "none", "--patience", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through train_cnn.py (the seed's entry point), with --port on a taken port."""
    from tests.conftest import SAMPLE

    root = tmp_path_factory.mktemp("run")
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "data" / "raw" / name).mkdir(parents=True)
        for f in sorted((SAMPLE / name).iterdir())[:14]:
            (root / "data" / "raw" / name / f.name).write_bytes(f.read_bytes())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "train_cnn.py"), "--data-dir", str(root / "data"), "--output-dir",
             str(root / "outputs"), "--port", str(port), *TINY], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_training_writes_every_artifact(trained):
    root, result = trained
    out = root / "outputs"
    for name in ("models/model.h5", "models/best_feature_extractor.keras", "models/best_finetuned.keras",
                 "models/class_names.json", "reports/classification_report.csv", "reports/summary.json",
                 "plots/confusion_matrix.png", "plots/training_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "reports/summary.json").read_text())
    assert summary["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert set(summary["counts"]) == {"train", "val", "test"}
    assert sum(summary["counts"]["test"].values()) == summary["metrics"]["n_images"]
    assert 0 <= summary["metrics"]["accuracy"] <= 1 and 0 <= summary["metrics"]["auc"] <= 1
    assert set(summary["timings"]) == {"phase1_seconds", "phase2_seconds", "total_seconds"}
    assert summary["config"]["img_size"] == 32 and summary["versions"]["keras"]
    rows = list(csv.reader((out / "reports/classification_report.csv").open()))
    assert rows[0] == ["class", "precision", "recall", "f1-score", "support"]
    assert {r[0] for r in rows} >= {"NORMAL", "PNEUMONIA", "accuracy"}
    assert json.loads((out / "models/class_names.json").read_text())["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert not list(out.rglob("*.partial*")) and not (out / "models/.staging").exists()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    # the port was taken: a warning, and training went on
    assert "in use" in result.stderr and "Traceback" not in result.stderr
    assert "NORMAL" in result.stdout and "Test: accuracy" in result.stdout


def test_seed_inference_snippet_runs_on_model_h5(trained):
    root, _ = trained
    code = f"""
import numpy as np
from keras.models import load_model
from keras.applications.efficientnet import preprocess_input
model = load_model({str(root / 'outputs/models/model.h5')!r})
x = preprocess_input(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype('float32'))
p = model.predict(x, verbose=0)
assert p.shape == (2, 2) and np.allclose(p.sum(axis=1), 1, atol=1e-4)
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_predict_reports_label_and_probability_per_image(trained, capsys):
    root, _ = trained
    model = str(root / "outputs/models/model.h5")
    folder = root / "data/test/PNEUMONIA"
    assert main(["predict", str(folder), "--model", model, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(list(folder.iterdir()))
    for r in records:
        assert r["label"] in ("NORMAL", "PNEUMONIA")
        assert r["probability"] == pytest.approx(max(r["p_NORMAL"], r["p_PNEUMONIA"]))
    one = next(folder.iterdir())
    assert main(["predict", str(one), "--model", model, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,label,probability") and len(lines) == 2
    assert main(["predict", str(one), "--model", model]) == 0
    assert str(one) in capsys.readouterr().out


def test_deterministic_runs_give_the_same_numbers(xray_raw, tmp_path):
    summaries = []
    for run in ("a", "b"):
        assert main(["train", "--data-dir", str(xray_raw), "--output-dir", str(tmp_path / run), "--deterministic",
                     *TINY]) == 0
        summaries.append(json.loads((tmp_path / run / "reports/summary.json").read_text()))
    assert summaries[0]["history"] == summaries[1]["history"]
    assert summaries[0]["metrics"] == summaries[1]["metrics"]


def two_classes(root, per_class=6):
    for c, name in enumerate(("A", "B")):
        for i in range(per_class):
            write_image(root / "raw" / name / f"{name}{i}.png", seed=c * 100 + i, size=24)
    return root


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: None, [], "no such folder"),
    (lambda d: d.mkdir(), [], "found neither train/<Class>/ nor raw/<Class>/"),
    (lambda d: write_image(d / "raw" / "A" / "a.png"), [], "only one class"),
    (lambda d: (write_image(d / "raw" / "A" / "a.png"), (d / "raw" / "B").mkdir()), [], "class folder has no images"),
    (lambda d: (two_classes(d), (d / "raw" / "A" / "notes.txt").write_text("x")), ["--strict"], "notes.txt"),
    (lambda d: (two_classes(d), (d / "raw" / "B" / "bad.png").write_bytes(b"nope")), ["--strict"], "bad.png"),
    (two_classes, ["--val-split", "1.5"], "--val-split must be between 0 and 1"),
    (two_classes, ["--epochs", "0"], "--epochs must be at least 1"),
    (two_classes, ["--weights", "missing.h5"], "missing.h5: no such file"),
    (two_classes, ["--frozen-layers", "500"], "leaves nothing to fine-tune"),
])
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys, make, extra, message):
    data = tmp_path / "data"
    make(data)
    code = main(["train", "--data-dir", str(data), "--output-dir", str(tmp_path / "out"), *TINY, *extra])
    err = capsys.readouterr().err
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], err


def test_unwritable_output_folder_is_a_user_error(tmp_path, capsys):
    two_classes(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", "--data-dir", str(tmp_path / "data"), "--output-dir", str(blocker / "out"), *TINY]) == 2
    assert "output folder is not writable" in capsys.readouterr().err


def test_predict_mistakes_are_user_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing.png"), "--model", str(tmp_path / "m.h5")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    image = write_image(tmp_path / "x.png")
    assert main(["predict", str(image), "--model", str(tmp_path / "m.h5")]) == 2
    assert "class_names.json" in capsys.readouterr().err


def test_bad_option_value_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_cnn.py"), "--img-size", "big"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--img-size" in result.stderr


def test_user_error_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_cnn.py"), "--data-dir", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"cxr: error: {tmp_path / 'none'}: no such folder; point --data-dir at a folder " \
                                    "with train/<Class>/ or raw/<Class>/"


@pytest.mark.parametrize("options", [["--no-feature-cache"], ["--mixed-precision", "--class-weight", "balanced"]])
def test_other_training_paths_run_end_to_end(xray_raw, tmp_path, options):
    assert main(["train", "--data-dir", str(xray_raw), "--output-dir", str(tmp_path / "out"), *TINY, *options]) == 0
    summary = json.loads((tmp_path / "out/reports/summary.json").read_text())
    assert [e["phase"] for e in summary["history"]] == [1, 2]
    assert summary["metrics"]["auc"] is not None
    import keras

    probabilities = keras.models.load_model(tmp_path / "out/models/model.h5").predict(np.zeros((1, 32, 32, 3)),
                                                                                       verbose=0)
    assert probabilities.dtype == np.float32 and probabilities.sum() == pytest.approx(1, abs=1e-3)
