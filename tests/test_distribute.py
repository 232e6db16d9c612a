"""`--strategy mirrored` on CPU: MirroredStrategy over two logical CPU devices trains, writes the usual
artifacts, predicts one row per image and resumes after a kill. Each run is a child process, because logical
devices must be set before TensorFlow starts."""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY, kill_after_epoch

TWO_CPUS = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cxr.cli import main

sys.exit(main(sys.argv[1:]))
"""


def on_two_cpus(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", TWO_CPUS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.fixture
def options(xray_raw):
    return ["train", "--data-dir", str(xray_raw), "--strategy", "mirrored", "--deterministic", *TINY,
            "--epochs", "3", "--patience", "3", "--bootstrap", "20"]


def test_mirrored_over_two_logical_cpus_trains_writes_the_artifacts_and_predicts_one_row_per_image(options, xray_raw,
                                                                                                   tmp_path):
    run = on_two_cpus(*options, "--output-dir", str(tmp_path / "out"))
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "out/reports/summary.json").read_text())
    assert summary["strategy"] == {"name": "mirrored", "replicas": 2} and summary["config"]["strategy"] == "mirrored"
    assert summary["metrics"]["n_images"] == sum(summary["counts"]["test"].values())
    assert [e["epoch"] for e in summary["history"] if e["phase"] == 1] == [1, 2, 3]
    for name in ("model.h5", "class_names.json", "best_feature_extractor.keras", "best_finetuned.keras"):
        assert (tmp_path / "out/models" / name).is_file()
    images = sorted((xray_raw / "test").rglob("*.jpeg"))
    predicted = subprocess.run([sys.executable, "-m", "cxr", "predict", *map(str, images), "--model",
                                str(tmp_path / "out/models/model.h5"), "--format", "json"],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0 and len(json.loads(predicted.stdout)) == len(images)


def test_a_mirrored_run_killed_after_an_epoch_resumes_to_the_numbers_of_an_uninterrupted_one(options, tmp_path):
    whole_run = on_two_cpus(*options, "--output-dir", str(tmp_path / "whole"))
    _, err = whole_run.communicate(timeout=600)
    assert whole_run.returncode == 0, err[-3000:]
    whole = json.loads((tmp_path / "whole/reports/summary.json").read_text())
    kill_after_epoch(on_two_cpus(*options, "--output-dir", str(tmp_path / "cut")), tmp_path / "cut", phase=1)
    resumed = on_two_cpus(*options, "--output-dir", str(tmp_path / "cut"), "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming phase 1 after epoch" in out
    summary = json.loads((tmp_path / "cut/reports/summary.json").read_text())
    assert [(e["phase"], e["epoch"]) for e in summary["history"]] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert summary["history"] == whole["history"] and summary["metrics"] == whole["metrics"]
