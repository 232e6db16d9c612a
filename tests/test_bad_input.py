"""Faults from the bad-input audit (issue 17): each gives a clear answer instead of a crash or a silent error."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.cli import main
from cxr.training.config import Config
from cxr.data.decode import UnreadableImage, decode_image, try_decode
from cxr.data.pipeline import decode_all
from cxr.data.split import list_class_folders
from cxr.errors import UserError
from cxr.commands.predict import overlay_names
from cxr.bundle.saved_model import SavedModel
from tests.conftest import SAMPLE, write_image


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_sbit(png_bytes, bits):
    """The PNG with an sBIT chunk declaring `bits` significant bits, right after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4
    return png_bytes[:ihdr_end] + png_chunk(b"sBIT", bytes([bits])) + png_bytes[ihdr_end:]


def test_twelve_bit_xrays_in_sixteen_bit_pngs_decode_like_their_eight_bit_copy(tmp_path):
    with Image.open(sorted((SAMPLE / "NORMAL").iterdir())[0]) as img:
        eight = np.asarray(img.convert("L"), dtype=np.uint16)
    Image.fromarray(eight * 16 + 8).save(tmp_path / "twelve.png")  # 12-bit values 8-4088, no sBIT
    Image.fromarray(eight.astype(np.uint8)).save(tmp_path / "eight.png")
    reference = decode_image(tmp_path / "eight.png", 64).astype(int)
    assert np.abs(decode_image(tmp_path / "twelve.png", 64).astype(int) - reference).max() <= 1
    # A dark 12-bit image (maximum 2047) with its sBIT chunk is scaled by 4095, not by its maximum
    Image.fromarray(eight * 8).save(tmp_path / "dark.png")
    (tmp_path / "dark-sbit.png").write_bytes(with_sbit((tmp_path / "dark.png").read_bytes(), 12))
    dark = decode_image(tmp_path / "dark-sbit.png", 64).astype(int)
    assert np.abs(dark - reference // 2).max() <= 1
    assert decode_image(tmp_path / "dark.png", 64).mean() > dark.mean() * 1.8  # no sBIT: 2047 is full scale


def test_twelve_bit_png_predicts_like_its_eight_bit_copy(tmp_path):
    from cxr.model.networks import build_classifier

    with Image.open(sorted((SAMPLE / "PNEUMONIA").iterdir())[0]) as img:
        eight = np.asarray(img.convert("L"), dtype=np.uint16)
    Image.fromarray(eight * 16).save(tmp_path / "twelve.png")
    Image.fromarray(eight.astype(np.uint8)).save(tmp_path / "eight.png")
    keras_model = build_classifier("test-efficientnet", 2, weights="none", img_size=64)
    model = SavedModel.from_keras(keras_model, ["NORMAL", "PNEUMONIA"], 64, "test-efficientnet")
    model.save(tmp_path / "model")
    saved = SavedModel.load(tmp_path / "model" / "model.h5")
    x = np.stack([decode_image(tmp_path / name, 64) for name in ("twelve.png", "eight.png")])
    probabilities, _ = saved.predict(x)
    assert np.abs(probabilities[0] - probabilities[1]).max() < 0.01


def test_file_names_that_are_not_utf8_are_decoded_and_cached(tmp_path):
    name = os.fsdecode(b"R\xf6ntgen.png")  # Latin-1, as an old Windows export names it
    write_image(tmp_path / name)
    images, bad = decode_all([tmp_path / name], 16, tmp_path / "cache")
    assert not bad and images.shape == (1, 16, 16, 3)


def decompression_bomb(path):
    """A PNG whose header claims 20,000 x 20,000 pixels (PIL refuses such files as decompression bombs)."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + png_chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_unreadable_images_not_crashes(tmp_path):
    bomb = decompression_bomb(tmp_path / "bomb.png")
    with pytest.raises(UnreadableImage, match="bomb.png"):
        decode_image(bomb, 32)
    image, reason = try_decode(bomb, 32)
    assert image is None and "decompression bomb" in reason


def test_explain_gives_every_input_its_own_overlay_name(tmp_path):
    paths = [tmp_path / "a" / "scan.jpeg", tmp_path / "a" / "scan.png", tmp_path / "b" / "scan.jpeg",
             tmp_path / "b" / "other.png"]
    names = overlay_names(paths)
    assert len(set(names.values())) == len(paths)
    assert names[paths[0]] == "a__scan.jpeg.gradcam.png" and names[paths[3]] == "other.gradcam.png"


@pytest.mark.parametrize("content, message", [
    ('{"class_names": ["NORMAL", "PNEU', "not readable as JSON"),
    ("", "not readable as JSON"),
    ("{}", "a list of two or more distinct names"),
    ('{"class_names": ["A", "A"]}', "a list of two or more distinct names"),
    ('{"class_names": ["NORMAL", "PNEUMONIA"], "positive_class": "COVID"}', "'COVID' is not one of its class_names"),
    ('{"class_names": ["NORMAL", "PNEUMONIA"], "temperature": -1}', "temperature must be a positive number"),
    ('{"class_names": ["NORMAL", "PNEUMONIA"], "test_time_scales": "0.9"}', "test_time_scales must be a list"),
])
def test_a_damaged_class_names_json_is_a_user_error(tmp_path, content, message):
    (tmp_path / "model.h5").write_bytes(b"a model")
    (tmp_path / "class_names.json").write_text(content)
    with pytest.raises(UserError, match=message):
        SavedModel.load(tmp_path / "model.h5")


@pytest.mark.parametrize("argv, message", [
    (["predict", "x.png", "--batch-size", "-1"], "--batch-size: must be at least 1, got -1"),
    (["predict", "x.png", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["evaluate", "--data-dir", "d", "--batch-size", "-1"], "--batch-size: must be at least 1"),
    (["evaluate", "--data-dir", "d", "--bootstrap", "-5"], "--bootstrap: must be at least 0, got -5"),
])
def test_predict_and_evaluate_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    ({"seed": -1}, "--seed must be 0 or more"),
    ({"group_pattern": "("}, "--group-pattern '(' is not a valid regular expression"),
    ({"lr": float("inf")}, "--lr and --finetune-lr must be between 0 and 1"),
    ({"finetune_lr": 1e300}, "--lr and --finetune-lr must be between 0 and 1"),
])
def test_training_options_no_run_could_use_are_refused(changes, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Config(**changes).validate()


def test_class_folders_that_differ_only_in_case_are_refused(tmp_path):
    write_image(tmp_path / "PNEUMONIA" / "a.png")
    write_image(tmp_path / "Pneumonia" / "b.png")
    write_image(tmp_path / "NORMAL" / "c.png")
    with pytest.raises(UserError, match="PNEUMONIA, Pneumonia differ only in case"):
        list_class_folders(tmp_path)


def test_an_output_folder_held_by_a_live_process_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import subprocess
    import sys

    from cxr.bundle.artifacts import LOCK_FILE, Outputs

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / LOCK_FILE).write_text(f"{sleeper.pid}\n")
        with pytest.raises(UserError, match=f"in use by PID {sleeper.pid}"):
            Outputs(tmp_path / "out").prepare()
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / "out" / "cache").mkdir(exist_ok=True)
    leftover = tmp_path / "out" / "cache" / ".images-32px-abc.x1.partial.npy"
    leftover.write_bytes(b"half")
    Outputs(tmp_path / "out").prepare()  # the holder died: a stale lock
    assert (tmp_path / "out" / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not leftover.exists()


def test_a_long_file_name_is_written_in_one_piece(tmp_path):
    from cxr.atomic import write_bytes

    target = tmp_path / ("x" * 230 + ".gradcam.png")  # 241 characters, as explain names an overlay
    write_bytes(target, b"png")
    assert target.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_images_outside_the_class_folders_are_named_not_silently_dropped(tmp_path, capsys):
    from cxr.data.split import prepare_splits

    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(8):
            write_image(tmp_path / "train" / name / f"person{c}{i}_x.png", seed=c * 10 + i)
    write_image(tmp_path / "train" / "stray.png")
    prepare_splits(Config(data_dir=tmp_path))
    assert "1 images lie outside the class folders" in capsys.readouterr().err


def test_an_output_folder_inside_the_training_images_is_refused_before_anything_is_written(tmp_path, capsys):
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(6):
            write_image(tmp_path / "data" / "train" / name / f"{name}{i}.png", seed=c * 10 + i)
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "data/train/out"),
                 "--weights", "none", "--backbone", "test-efficientnet"]) == 2
    assert "is inside the data's train/ folder" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the image rotated 90 degrees clockwise
    Image.fromarray(wide).save(tmp_path / "turned.jpeg", exif=exif.tobytes(), quality=95)
    image = decode_image(tmp_path / "turned.jpeg", 40).astype(int)
    assert image[:10].mean() > 200 and image[-10:].mean() < 50  # the white half is now on top


def test_tensorboard_dies_with_a_killed_training_run(xray_raw, tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "cxr", "train", "--data-dir", str(xray_raw), "--output-dir",
                              str(tmp_path / "out"), "--port", str(port), "--img-size", "32", "--epochs", "50",
                              "--patience", "50", "--weights", "none", "--backbone", "test-efficientnet"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    def serving():
        with socket.socket() as client:
            return client.connect_ex(("127.0.0.1", port)) == 0

    deadline = time.monotonic() + 120
    while not serving() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert serving(), "TensorBoard never started"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    deadline = time.monotonic() + 20
    while serving() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not serving(), "TensorBoard outlived its training run"


def as_unprivileged(argv, home):
    """Run `python -m cxr ARGV` as the user nobody (tests run as root, whom no permission stops)."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as an unprivileged user")
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"), "KERAS_HOME": str(home / "keras"),
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "cxr",
                           *argv], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def shared_tmp():
    """A folder every user can enter (pytest's own tmp_path is private to root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="cxr-perm-"))
    folder.chmod(0o755)
    (folder / "home").mkdir()
    os.chown(folder / "home", 65534, 65534)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_read_only_raw_folder_is_one_error_line(shared_tmp):
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(6):
            write_image(shared_tmp / "data" / "raw" / name / f"{name}{i}.png", seed=c * 10 + i)
    for folder in [shared_tmp / "data", *(shared_tmp / "data").rglob("*")]:
        folder.chmod(0o755 if folder.is_dir() else 0o644)  # readable by everyone, writable by root only
    (shared_tmp / "out").mkdir()
    os.chown(shared_tmp / "out", 65534, 65534)
    result = as_unprivileged(["train", "--data-dir", str(shared_tmp / "data"), "--output-dir", str(shared_tmp / "out"),
                              "--weights", "none", "--backbone", "test-efficientnet"], shared_tmp / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxr: error:")]
    assert len(errors) == 1 and "can't write the train/val/test split" in errors[0]


def test_a_write_failure_after_training_is_one_line_naming_the_path(shared_tmp):
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(8):
            write_image(shared_tmp / "data" / "train" / name / f"person{c}{i}_x.png", seed=c * 10 + i, size=32)
    for folder in [shared_tmp / "data", *(shared_tmp / "data").rglob("*")]:
        folder.chmod(0o755 if folder.is_dir() else 0o644)
    out = shared_tmp / "out"
    for folder in (out, out / "models", out / "plots", out / "logs", out / "cache"):
        folder.mkdir(parents=True)
        os.chown(folder, 65534, 65534)
    (out / "reports").mkdir(mode=0o755)  # root's: the run can't write its reports
    result = as_unprivileged(["train", "--data-dir", str(shared_tmp / "data"), "--output-dir", str(out),
                              "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--weights", "none",
                              "--backbone", "test-efficientnet", "--bootstrap", "0"], shared_tmp / "home")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxr: error:")]
    assert len(errors) == 1 and str(out / "reports") in errors[0] and "Permission denied" in errors[0], errors
    assert not list(out.rglob("*.partial*"))


def test_a_damaged_dicom_among_the_images_is_skipped_saying_which_and_why(tmp_path, capsys):
    from cxr.data.split import prepare_splits

    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(10):
            write_image(tmp_path / "train" / name / f"{name}{i}.png", seed=c * 50 + i)
    (tmp_path / "train" / "NORMAL" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # no extension
    dataset = prepare_splits(Config(data_dir=tmp_path))
    assert any(p.name == "IM0001" for p in dataset.paths)  # a DICOM by its content
    dataset.decode(16, tmp_path / "cache")
    err = capsys.readouterr().err
    assert "skipped 1 unreadable or refused images" in err and "IM0001 (" in err and "DICOM" in err
