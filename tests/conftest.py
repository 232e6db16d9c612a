import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chest_xray_sample" / "raw"


def write_image(path, seed=0, size=40, mode="RGB"):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch):
    """Caches (LiteRT conversions) go into the test's folder, not the user's home, and a run's global dtype
    policy (`--mixed-precision`) doesn't leak into the next test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
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
