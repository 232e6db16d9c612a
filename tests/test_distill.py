"""Phase 3 (`--distill`): one view trained on the test-time views' features, served only past its guard."""

import json
import shutil

import keras
import numpy as np
import pytest

from cxr import distill, models
from cxr.cli import main
from cxr.config import Config
from cxr.errors import UserError
from tests.conftest import SAMPLE

TINY = dict(img_size=32, epochs=1, finetune_epochs=1, batch_size=8, backbone="efficientnet-lite0", weights="none",
            patience=1, bootstrap=0, precision="float32")


@pytest.fixture
def data(tmp_path):
    for name in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "data" / "raw" / name).mkdir(parents=True)
        for f in sorted((SAMPLE / name).iterdir())[:14]:
            shutil.copy2(f, tmp_path / "data" / "raw" / name / f.name)
    return tmp_path / "data"


def trained(data, out, monkeypatch, tolerance):
    from cxr import run

    monkeypatch.setattr(distill, "AUC_TOLERANCE", tolerance)
    summary = run.train(Config(data_dir=data, output_dir=out, distill=True, **TINY))
    info = json.loads((out / "models" / "class_names.json").read_text())
    return summary, info, keras.models.load_model(out / "models" / "model.h5", compile=False)


def test_a_student_that_passes_its_guard_is_served_as_one_view(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    summary, info, saved = trained(data, out, monkeypatch, tolerance=1.0)  # any validation AUC passes
    record = summary["distillation"]
    assert record["served"] == "one view" and record["teacher_scales"] == [0.9, 1.0]
    assert info["test_time_scales"] == [1.0] and info["distillation"] == record
    assert not models.has_test_time_scales(saved)  # one forward pass per image
    assert "Phase 3: serving one view" in capsys.readouterr().out
    assert summary["timings"]["phase3_seconds"] > 0
    # the student trained: its upper blocks moved away from the fine-tuned teacher's
    teacher = keras.models.load_model(out / "models" / f"best_{'finetuned' if summary['final_phase'] == 2 else 'feature_extractor'}.keras",
                                      compile=False)
    assert not np.allclose(saved.get_layer("block6a_expand_conv").get_weights()[0],
                           teacher.get_layer("block6a_expand_conv").get_weights()[0])
    image = sorted((SAMPLE / "PNEUMONIA").iterdir())[-1]
    assert main(["predict", str(image), "--model", str(out / "models" / "model.h5"), "--format", "json"]) == 0
    assert main(["export", "--model", str(out / "models" / "model.h5"), "--format", "tflite",
                 "--output-dir", str(tmp_path / "exported")]) == 0
    card = json.loads((tmp_path / "exported" / "model-card.json").read_text())
    assert card["distillation"]["served"] == "one view" and card["test_time_scales"] == [1.0]


def test_a_student_that_fails_its_guard_gives_the_views_back_and_says_why(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    summary, info, saved = trained(data, out, monkeypatch, tolerance=-1.0)  # no validation AUC passes
    record = summary["distillation"]
    assert record["served"] == "views" and "lower than the views'" in record["reason"]
    assert info["test_time_scales"] == [0.9, 1.0] and models.has_test_time_scales(saved)
    teacher = keras.models.load_model(out / "models" / f"best_{'finetuned' if summary['final_phase'] == 2 else 'feature_extractor'}.keras",
                                      compile=False)
    # the teacher's weights, not the student's, went into the saved views
    served = models.with_test_time_scales(teacher, [0.9, 1.0])
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(saved.predict(x, verbose=0), served.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(test_time_scales=[1.0]), "--test-time-scales with two or more"),
    (dict(feature_cache=False), "drop --no-feature-cache"),
])
def test_distill_without_views_or_cache_is_one_clear_line(options, message):
    with pytest.raises(UserError, match=message):
        Config(data_dir="x", backbone="efficientnet-lite0", distill=True, **options).validate()


def test_a_run_killed_in_phase_3_resumes_there_and_reuses_its_arrays(data, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import TINY as TINY_OPTIONS

    out = tmp_path / "out"
    options = ["--data-dir", str(data), "--output-dir", str(out), "--distill", "--precision", "float32", *TINY_OPTIONS]
    child = subprocess.Popen([sys.executable, "-m", "cxr", "train", *options], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    staging = out / "models" / ".staging"
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        if (staging / "distill-val-teacher.npy").is_file():  # the arrays are complete: the student trains
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed in phase 3"
    assert not (out / "reports" / "summary.json").exists()

    capsys.readouterr()
    assert main(["train", *options, "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "Phase 3: serving" in resumed and "Phase 1:" not in resumed
    assert "computing the teacher's features" not in resumed  # the killed run's arrays were reused
    summary = json.loads((out / "reports" / "summary.json").read_text())
    assert summary["distillation"]["served"] in ("one view", "views")
    assert summary["distillation"]["val_auc_views"] is not None
    assert not staging.exists()  # published or removed with the run
