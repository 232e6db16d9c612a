import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chest_xray_sample" / "raw"
NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih_chestxray14_sample"
NIH_CSV, NIH_IMAGES = NIH / "Data_Entry_2017.csv", NIH / "images"


def write_image(path, seed=0, size=40, mode="RGB"):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture(scope="session")
def run_tmp(tmp_path_factory, worker_id):
    """A folder that every pytest-xdist worker of this run shares (the run's own base folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def made_once(run_tmp, name, make):
    """The folder run_tmp/name after `make(folder)` has filled it, once for the whole run: the first worker to
    ask makes it while the others wait on a file lock, then every worker reads the same folder (pytest-xdist's
    recipe for session fixtures). A `make` that failed leaves no mark, so the next worker to ask tries again."""
    from filelock import FileLock

    folder = run_tmp / name
    with FileLock(str(run_tmp / f"{name}.lock")):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def litert_cache(run_tmp):
    """The suite's one cache folder ($XDG_CACHE_HOME), shared by its workers: LiteRT conversions are keyed by the
    model file's hash, so every test and command that runs one of the session's trained models converts it once
    (a training writes its conversions there too), not once per test. Its files are written atomically."""
    return made_once(run_tmp, "xdg-cache", lambda folder: None)


@pytest.fixture(autouse=True)
def isolated_run(litert_cache, monkeypatch, tmp_path):
    """Caches (LiteRT conversions) go into the suite's folder, not the user's home; a command's default folders
    (outputs/, cams/) into the test's own, not the checkout both workers share; and a run's global dtype policy
    (`--mixed-precision`) doesn't leak into the next test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(litert_cache))
    monkeypatch.chdir(tmp_path)
    yield
    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy("float32")


@pytest.fixture
def xray_raw(tmp_path):
    """A raw/<Class>/ folder with 12 real chest X-rays per class from the committed sample."""
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((SAMPLE / name).iterdir())[:12]
        (tmp_path / "data" / "raw" / name).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp_path / "data" / "raw" / name / f.name)
    return tmp_path / "data"


def chromium():
    """The system Chromium (Debian's package), or skip (fail in CI, which installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CXR_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (CI installs the Debian package chromium)")
        pytest.skip("chromium is not installed; apt-get install chromium")
    return found


def headless_browser(tmp_path):
    """A Selenium Chrome driver on the system Chromium, headless (skip, or fail in CI, without the driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        if os.environ.get("CXR_REQUIRE_CHROMIUM"):
            pytest.fail("chromedriver is not installed (CI installs the Debian package chromium-driver)")
        pytest.skip("chromedriver is not installed; apt-get install chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


TINY = ["--img-size", "32", "--epochs", "1", "--batch-size", "8", "--backbone", "test-efficientnet",
        "--weights", "none", "--patience", "1", "--bootstrap", "20", "--population-check", "always"]


@pytest.fixture(scope="session")
def tiny_training(run_tmp, litert_cache):
    """(root, the finished process) of the suite's one tiny two-class training: the seed's entry point
    (train_cnn.py) on 14 real X-rays per class, with --port on a port that is taken. root/data holds the raw
    folder and the splits; root/outputs the run's outputs."""
    import socket

    def make(root):
        for name in ("NORMAL", "PNEUMONIA"):
            (root / "data" / "raw" / name).mkdir(parents=True)
            for f in sorted((SAMPLE / name).iterdir())[:14]:
                shutil.copy2(f, root / "data" / "raw" / name / f.name)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            result = subprocess.run([sys.executable, str(SAMPLE.parents[2] / "train_cnn.py"), "--data-dir",
                                     str(root / "data"), "--output-dir", str(root / "outputs"), "--port",
                                     str(taken.getsockname()[1]), "--bootstrap", "50", *TINY],
                                    capture_output=True, text=True, timeout=600,
                                    env=os.environ | {"XDG_CACHE_HOME": str(litert_cache)})
        assert result.returncode == 0, result.stderr[-3000:]
        (root / "process.json").write_text(json.dumps([result.args, result.stdout, result.stderr]))

    root = made_once(run_tmp, "tiny-run", make)
    args, stdout, stderr = json.loads((root / "process.json").read_text())
    return root, subprocess.CompletedProcess(args, 0, stdout, stderr)


@pytest.fixture(scope="session")
def tiny_run(tiny_training):
    """The outputs/ folder of the tiny training (for the commands that start from a trained model)."""
    return tiny_training[0] / "outputs"


KERMANY_TRAIN = NIH.parents[0] / "chest_xray" / "train"


@pytest.fixture(scope="session")
def kermany_run(run_tmp, litert_cache):
    """The root (data/, outputs/) of a small `cxr train` on 120 real pediatric X-rays per class of the Kermany
    train folder, at 64 px from Lite0's ImageNet weights, float32: a model whose features are real, as int8 and
    the population check meet them in practice (a tiny model from random weights has neither)."""
    if not KERMANY_TRAIN.is_dir():
        pytest.skip("../shared/data/chest_xray is not here")

    def make(root):
        for name in ("NORMAL", "PNEUMONIA"):
            (root / "data/raw" / name).mkdir(parents=True)
            for f in sorted((KERMANY_TRAIN / name).iterdir())[:120]:
                shutil.copy2(f, root / "data/raw" / name / f.name)
        result = subprocess.run([sys.executable, "-m", "cxr", "train", "--data-dir", str(root / "data"),
                                 "--output-dir", str(root / "outputs"), "--img-size", "64", "--epochs", "1",
                                 "--batch-size", "16", "--backbone", "efficientnet-lite0", "--patience", "1",
                                 "--bootstrap", "20", "--false-flag-rate", "0.05", "--precision", "float32",
                                 "--population-check", "always"],  # its 36 validation images: below the 99 needed
                                capture_output=True, text=True, timeout=900,
                                env=os.environ | {"XDG_CACHE_HOME": str(litert_cache)})
        assert result.returncode == 0, result.stderr[-3000:]

    return made_once(run_tmp, "kermany", make)


def kill_after_epoch(child, output_dir, phase, timeout=300):
    """SIGKILL the training process `child` as soon as the resume state in `output_dir` has an epoch of
    `phase` done; wait for it to die."""
    state_file = Path(output_dir) / "models/.staging/resume/state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("phase") == phase and state.get("epoch", 0) >= 1:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the run ended before it could be killed in phase {phase}"


def nih_rows(n, start=0):
    """The header and `n` data lines of the real NIH ChestX-ray14 CSV, as text lines."""
    lines = NIH_CSV.read_text().splitlines()
    return [lines[0], *lines[1 + start:1 + start + n]]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# a code in a site's own coding scheme (the code and scheme are the site's; no standard one is claimed)
SITE_CODES = ["class,code,meaning,scheme", "Pleural_Thickening,PT1,Pleural thickening,99LOCAL"]


@pytest.fixture(scope="session")
def tiny_multilabel(run_tmp, litert_cache):
    """(outputs folder, an evaluation CSV of other images) of one tiny `cxr train --labels` on 80 NIH images, with a
    site's own code for Pleural_Thickening (SITE_CODES), the one NIH finding cxr's vocabulary has no code for."""
    if not NIH_CSV.is_file():
        pytest.skip("../shared/data/nih_chestxray14_sample is not here")

    def make(root):
        train_csv = write_lines(root / "train.csv", nih_rows(80))
        write_lines(root / "other.csv", nih_rows(30, start=100))
        codes = write_lines(root / "codes.csv", SITE_CODES)
        result = subprocess.run([sys.executable, "-m", "cxr", "train", "--labels", str(train_csv), "--images",
                                 str(NIH_IMAGES), "--output-dir", str(root / "outputs"), *TINY, "--bootstrap", "30",
                                 "--codes", str(codes)],
                                capture_output=True, text=True, timeout=600,
                                env=os.environ | {"XDG_CACHE_HOME": str(litert_cache)})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "mean AUC" in result.stdout
        assert "no SNOMED CT code" not in result.stderr  # every finding has a code: the vocabulary's or the site's

    root = made_once(run_tmp, "multilabel", make)
    return root / "outputs", root / "other.csv"
