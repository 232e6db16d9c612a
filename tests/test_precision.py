"""int8 inference: the conversion, the accuracy guard that decides whether it is served, and how the choice is
recorded and used."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import SAMPLE, TINY


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory, litert_cache):
    """The outputs of a 64 px Lite0 from ImageNet weights, one epoch on the 120 sample X-rays: a model whose
    features are real, as int8 meets them in practice (a tiny model from random weights is not). Not conftest's
    kermany_run: on that model (240 images) int8's calibrated probabilities moved by up to 0.47, against 0.05 here
    (2026-12-07); which models int8 holds up on is issue 48's."""
    root = tmp_path_factory.mktemp("imagenet-run")
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "data" / "raw" / name).mkdir(parents=True)
        for f in sorted((SAMPLE / name).iterdir()):
            (root / "data" / "raw" / name / f.name).write_bytes(f.read_bytes())
    result = cxr("train", "--data-dir", root / "data", "--output-dir", root / "outputs", "--img-size", "64", "--epochs",
                 "1", "--batch-size", "16", "--backbone", "efficientnet-lite0", "--bootstrap", "20", "--precision",
                 "float32", cache=litert_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "outputs"


def test_a_model_of_the_readme_sample_has_no_population_check_and_each_answer_says_why(imagenet_run, litert_cache):
    """Issue 46: the 120-image sample's model (18 validation images) flagged 22 % of its own test images."""
    info = json.loads((imagenet_run / "models" / "class_names.json").read_text())
    assert "its validation split had 18 images, and at least 99 are needed" in info["population_unavailable"]
    assert not (imagenet_run / "models" / "population.npz").exists()
    test = [r["path"] for r in csv.DictReader(open(imagenet_run / "reports" / "splits.csv")) if r["split"] == "test"]
    result = cxr("predict", *test, "--model", imagenet_run / "models" / "model.h5", "--format", "json",
                 cache=litert_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(r["in_distribution"] is None for r in json.loads(result.stdout))
    assert "population check is unavailable for this model: its validation split had 18 images" in result.stderr
    summary = json.loads((imagenet_run / "reports" / "summary.json").read_text())
    assert summary["population_check"] == {"available": False, "note": info["population_unavailable"]}


def run_dataset(run, size=32):
    """A run's train, val and test splits as a Dataset, decoded at `size`."""
    from cxr.data.dataset import Dataset
    from cxr.data.decode import decode_image

    with open(run / "reports" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["class"] for r in rows})
    dataset = Dataset.from_files(names, {s: [(r["path"], names.index(r["class"])) for r in rows if r["split"] == s]
                                         for s in ("train", "val", "test")})
    dataset.images = np.stack([decode_image(p, size) for p in dataset.paths])
    return dataset


def training_images(run, size):
    """(the run's splits as a Dataset, its training images): what int8 is calibrated on, as training does."""
    dataset = run_dataset(run, size)
    return dataset, dataset.images[dataset.splits["train"]]


def test_int8_probabilities_stay_close_to_float32_on_real_xrays(imagenet_run):
    from cxr.bundle import litert, precision
    from cxr.bundle.fidelity import PROBABILITY_TOLERANCE
    from cxr.bundle.saved_model import SavedModel
    from cxr.bundle.views_on_demand import int8_predictor

    model = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
    dataset, calibration = training_images(imagenet_run, 64)
    flatbuffers = precision.int8_views(model, calibration)  # as training converts it: one conversion per view
    assert sorted(flatbuffers) == ["", "view0.9"]
    for flatbuffer in flatbuffers.values():
        # the convolutions of the stem and blocks 1a and 2 stay float32, the backbone's others are int8: the
        # stem's convolution, block 1a's depthwise and projection, and blocks 2a and 2b's expansion, depthwise
        # and projection
        convolutions = conv_output_types(flatbuffer)
        first = {name: any(part.startswith(("stem_", "block1a_", "block2")) for part in name.split(";")[0].split("/"))
                 for name in convolutions}
        assert sum(first.values()) == 9, convolutions
        assert all(t == (np.float32 if first[name] else np.int8) for name, t in convolutions.items()), convolutions
    rows = np.concatenate([dataset.splits["val"], dataset.splits["test"]])
    images = dataset.images[rows]
    float_p, float_labels = model.calibrate(model.raw_outputs(images)[0])
    int8_raw = int8_predictor(flatbuffers, model.task).predict_on_batch(images)[:, :2]  # every view
    # the float32 probabilities leave int8 as they are, not rounded to int8's steps of 1/256 on the way out
    first_view = litert.LiteRTModel(flatbuffers[""]).predict_on_batch(images.astype(np.float32))[:, :2]
    assert np.abs(first_view * 256 - np.round(first_view * 256)).max() > 0.01, first_view
    int8_p, int8_labels = model.calibrate(int8_raw)
    difference = np.abs(int8_p - float_p).max()
    assert difference <= PROBABILITY_TOLERANCE, (difference, float_p[:, 1], int8_p[:, 1])
    # a label may change only where float32's probability lies within that tolerance of the threshold
    threshold = model.operating_point["threshold"]
    near = np.abs(float_p[:, 1] - threshold) <= difference if threshold is not None else np.ones(len(rows), bool)
    assert np.all((int8_labels == float_labels) | near), (threshold, float_p[:, 1], int8_p[:, 1])
    assert np.mean(int8_labels == float_labels) >= 0.95, (threshold, float_p[:, 1], int8_p[:, 1])


def conv_output_types(flatbuffer):
    """{output tensor name: dtype} of every convolution in a LiteRT flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    tensors = interpreter.get_tensor_details()
    return {tensors[op["outputs"][0]]["name"]: tensors[op["outputs"][0]]["dtype"]
            for op in interpreter._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")}


def sample_dataset(size):
    """The 120 X-rays of the committed sample as a validation split (and a training split of 8), decoded at `size`."""
    from cxr.data.dataset import Dataset
    from cxr.data.decode import decode_image

    files = [(p, k) for k, name in enumerate(("NORMAL", "PNEUMONIA")) for p in sorted((SAMPLE / name).iterdir())]
    dataset = Dataset.from_files(["NORMAL", "PNEUMONIA"], {"val": files, "train": files[:4] + files[-4:]})
    dataset.images = np.stack([decode_image(p, size) for p in dataset.paths])
    return dataset


@pytest.fixture(scope="module", autouse=True)
def int8_conversions_made_once():
    """This module's tests convert the same network with the same calibration images more than once (the guard's
    verdict, then int8 asked for): each conversion is made once and answered again from memory."""
    import hashlib

    from cxr.bundle import litert

    convert, made = litert.to_int8_flatbuffer, {}

    def once(model, calibration_images):
        key = hashlib.sha256(model.to_json().encode() + np.asarray(calibration_images).tobytes()
                             + b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
        if key not in made:
            made[key] = convert(model, calibration_images)
        return made[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(litert, "to_int8_flatbuffer", once)
        yield


@pytest.fixture(scope="module")
def black_choice(imagenet_run, litert_cache):
    """(model, record) of `serving.choose` "auto" for the ImageNet run's model with int8 calibrated on black
    images, so that int8 can represent no X-ray and fails its guard; float32 is served, with the views on demand
    wherever they pass their own guard (MIN_SPEEDUP 0: as fast is fast enough here)."""
    from cxr.bundle import serving, views_on_demand
    from cxr.bundle.saved_model import SavedModel

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(litert_cache))
        patch.setattr(views_on_demand, "MIN_SPEEDUP", 0.0)
        model = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
        model.predictor()
        record = serving.choose(model, sample_dataset(64), "auto", seed=0, calibration=BLACK)
    return model, record


BLACK = np.zeros((16, 64, 64, 3), np.uint8)  # calibrated on black images, int8 can represent no X-ray


def test_the_guard_serves_float32_when_int8_fails_it_and_says_why(black_choice, imagenet_run, tiny_run):
    from cxr.bundle import precision, serving
    from cxr.bundle.saved_model import SavedModel

    assert len(sample_dataset(64).splits["val"]) >= precision.MIN_VALIDATION_IMAGES
    model, record = black_choice
    # float32, with or without the views on demand (whose own guard decides them)
    assert record["precision"] == "float32" and model.engine.startswith("litert") and "int8" not in model.engine
    failed = ("lower than float32's", "differ from float32's", "not faster")
    assert any(f in record["reason"] for f in failed), record
    assert record["guard"]["val_auc_float32"] is not None

    # a tiny validation split can't tell 0.002 of AUC from chance: float32, saying so
    small = SavedModel.load(tiny_run / "models" / "model.h5")
    small.predictor()
    few = serving.choose(small, run_dataset(tiny_run), "auto", seed=0)
    assert few["precision"] == "float32" and few["reason"].startswith("too few validation images")

    # asked for int8 all the same, it is served, with the guard's verdict kept
    forced = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
    forced.predictor()
    record = serving.choose(forced, sample_dataset(64), "int8", seed=0, calibration=BLACK)
    assert record["precision"] == "int8" and forced.engine == "litert int8" and forced.plan.precision == "int8"
    assert any(f in record["guard"]["reason"] for f in failed)


def test_int8_is_converted_per_view_and_serves_the_views_on_demand(imagenet_run, tmp_path, monkeypatch):
    """Issue 48: int8 as float32, one conversion per test-time view, the second view only where the first leaves
    the answer uncertain (the margin fitted on validation against int8 with every view), chosen once by
    `serving.choose` where int8 passes its guard, saved, and loaded as the same plan."""
    from cxr.bundle import precision, serving, views_on_demand
    from cxr.evaluate.scoring import scoring
    from cxr.bundle.saved_model import SavedModel
    from cxr.bundle.serving import ServingPlan
    from cxr.errors import UserError
    from cxr.model.inference import predict_outputs

    dataset = sample_dataset(64)
    rows, y = dataset.split("val")
    model = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
    float_outputs = model.raw_outputs(dataset.images, rows)[0]
    # int8 passes its guard here (on this CPU it is not faster, which decides nothing about what is tested)
    real_guard = precision.guard
    monkeypatch.setattr(precision, "guard", lambda *args: (True, real_guard(*args)[1] | {"reason": "passed"}))
    monkeypatch.setattr(views_on_demand, "MIN_SPEEDUP", 0.0)
    # calibrated on the run's training images, as the test above converts it (int8_conversions_made_once)
    record = serving.choose(model, dataset, "auto", seed=0, calibration=training_images(imagenet_run, 64)[1])
    assert record["precision"] == "int8" and sorted(model._int8) == ["", "view0.9"]
    on_demand = record["views_on_demand"]
    assert on_demand["rebuilt_difference"] < 1e-5 and on_demand["margin"] in views_on_demand.MARGINS, on_demand
    assert model.plan == ServingPlan("int8", on_demand["margin"], "auto")
    assert model.engine == "litert int8, views on demand"
    served = model.raw_outputs(dataset.images, rows)[0]
    assert abs(scoring(model.task).auc(y, served) - scoring(model.task).auc(y, float_outputs)) < 0.02

    model.save(tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").glob("model.int8*")) == ["model.int8.tflite",
                                                                               "model.int8.view0.9.tflite"]
    loaded = SavedModel.load(tmp_path / "models" / "model.h5")
    assert loaded.plan == model.plan and loaded.engine is None
    np.testing.assert_allclose(loaded.raw_outputs(dataset.images, rows)[0], served, atol=1e-6)
    assert loaded.engine == "litert int8, views on demand"
    every_view = SavedModel.load(tmp_path / "models" / "model.h5", "int8")  # asked for: every view
    assert every_view.plan == ServingPlan("int8", None, "int8")
    every = every_view.raw_outputs(dataset.images, rows)[0]
    first = predict_outputs(loaded.predictor().first, dataset.images, rows)[:, :2]
    need = model.task.uncertain(first, on_demand["margin"])
    assert 0 < need.sum() <= len(rows)
    np.testing.assert_allclose(every[need], served[need], atol=1e-5)  # every view where the first is uncertain
    np.testing.assert_allclose(first[~need], served[~need], atol=1e-6)  # the first view's answer elsewhere
    (tmp_path / "models" / "model.int8.view0.9.tflite").unlink()
    with pytest.raises(UserError, match="model.int8.view0.9.tflite: not found; use the files of one training run"):
        SavedModel.load(tmp_path / "models" / "model.h5")


def cxr(*args, cache):
    return subprocess.run([sys.executable, "-m", "cxr", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=os.environ | {"XDG_CACHE_HOME": str(cache)})


def guarded(make_int8, speeds=(100.0, 150.0)):
    """(passed, record) of `precision.guard` for a made binary model: 1,000 validation images whose float32 logits
    are calibrated (labels drawn from them), and int8 logits `make_int8(logits, threshold)` (threshold: float32's
    operating point as a logit)."""
    from cxr.bundle import precision
    from cxr.model.task import Classes

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 1000)
    y = (rng.random(1000) < 1 / (1 + np.exp(-logits))).astype(int)
    names = ["NORMAL", "PNEUMONIA"]
    fit = precision.default_point_fitter(Classes(names))

    def outputs(z):
        p = 1 / (1 + np.exp(-z))
        return np.stack([1 - p, p], axis=1)

    def served(raw):
        return Classes(names).calibrate(fit(y, raw), raw)

    point = fit(y, outputs(logits))
    threshold = np.log(point["threshold"] / (1 - point["threshold"])) * point["temperature"]
    int8 = make_int8(logits.copy(), threshold, rng)
    return precision.guard(y, {"float32": outputs(logits), "int8": outputs(int8)}, served, Classes(names),
                           {"float32": speeds[0], "int8": speeds[1]})


def nearest_mirrored(z, threshold, rng, count=24):
    """The `count` images nearest the threshold called the other way."""
    near = np.argsort(np.abs(z - threshold))[:count]
    z[near] = 2 * threshold - z[near]
    return z


def pulled_in(z, threshold, rng):
    """25 images between 1 and 2 logits from the threshold pulled 0.45 towards it: each call kept."""
    d = z - threshold
    middle = np.flatnonzero((np.abs(d) > 1) & (np.abs(d) < 2))[:25]
    z[middle] -= 0.45 * np.sign(d[middle])
    return z


def one_moved(z, threshold, rng):
    """The most certain positive moved to just above the threshold."""
    z[np.argmax(z)] = threshold + 0.5
    return z


@pytest.mark.parametrize("make_int8, speeds, failed", [
    (lambda z, t, rng: z + rng.normal(0, 0.5, len(z)), (100, 150), "lower than float32's"),
    (nearest_mirrored, (100, 150), "calls agree with float32's on"),
    (pulled_in, (100, 150), "at the 99th percentile"),
    (one_moved, (100, 150), "on one image"),
    (lambda z, t, rng: np.sign(z) * (np.abs(z) + 0.7), (100, 150), "expected calibration error"),
    (lambda z, t, rng: z, (100, 90), "not faster"),
])
def test_each_condition_of_the_guard_keeps_float32_when_int8_fails_it(make_int8, speeds, failed):
    passed, record = guarded(make_int8, speeds)
    assert not passed and failed in record["reason"], record
    # the calls, the 99th percentile and the worst image are judged on their own: one condition, one reason
    if make_int8 in (nearest_mirrored, pulled_in, one_moved):
        assert ";" not in record["reason"], record


def test_int8_within_every_tolerance_passes_the_guard_with_its_numbers_recorded():
    passed, record = guarded(lambda z, t, rng: z + rng.normal(0, 0.03, len(z)))
    assert passed and record["reason"] == "passed the guard", record
    assert abs(record["val_auc_float32"] - record["val_auc_int8"]) < 0.002 and record["call_agreement"] >= 0.99
    assert record["calibrated_probability_difference"]["max"] <= 0.15 and record["ece_int8"] is not None
    assert record["tolerances"] == {"auc": 0.002, "call_agreement": 0.99, "probability_p99": 0.05,
                                    "probability_max": 0.15, "ece": 0.01}


def test_the_choice_is_recorded_saved_and_used_by_predict_and_export(tmp_path, monkeypatch, capsys):
    from cxr.cli import main

    data = tmp_path / "data"
    for name in ("NORMAL", "PNEUMONIA"):
        (data / "raw" / name).mkdir(parents=True)
        for f in sorted((SAMPLE / name).iterdir())[:14]:
            (data / "raw" / name / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    trained = cxr("train", "--data-dir", data, "--output-dir", out, "--bootstrap", "20", *TINY, "--precision", "int8",
                  cache=tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Inference precision: int8" in trained.stdout
    assert "fully_quantize" not in trained.stdout + trained.stderr  # the quantizer's settings, printed from C++
    info = json.loads((out / "models" / "class_names.json").read_text())
    assert info["inference"]["precision"] == "int8" and info["inference"]["guard"]["validation_images"] > 0
    assert (out / "models" / "model.int8.tflite").is_file()
    assert json.loads((out / "reports" / "summary.json").read_text())["inference"] == "litert int8"

    # the training's output is checked from its process; predict and export run here, in the same cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    capsys.readouterr()
    image = sorted((SAMPLE / "PNEUMONIA").iterdir())[-1]
    answers = {}
    for precision in ("auto", "float32"):
        assert main(["predict", str(image), "--model", str(out / "models" / "model.h5"), "--format", "json",
                     "--precision", precision]) == 0, capsys.readouterr().err[-2000:]
        answers[precision] = json.loads(capsys.readouterr().out)[0]["p_PNEUMONIA"]
    assert answers["auto"] != answers["float32"]  # auto serves int8, and int8 is not float32
    assert abs(answers["auto"] - answers["float32"]) < 0.2

    assert main(["export", "--model", str(out / "models" / "model.h5"), "--format", "tflite-int8", "--output-dir",
                 str(tmp_path / "exported")]) == 0, capsys.readouterr().err[-2000:]
    card = json.loads((tmp_path / "exported" / "model-card.json").read_text())
    assert card["inference"]["precision"] == "int8"
    assert card["exports"]["tflite-int8"]["calibration_images"] == len(
        [r for r in csv.DictReader(open(out / "reports" / "splits.csv")) if r["split"] == "train"])


def test_int8_asked_of_a_float32_model_is_one_clear_line(tiny_run, tmp_path):
    image = sorted((SAMPLE / "NORMAL").iterdir())[0]
    result = cxr("predict", image, "--model", tiny_run / "models" / "model.h5", "--precision", "int8",
                 cache=tmp_path / "cache")
    assert result.returncode == 2 and "no int8 conversion beside it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_views_on_demand_give_back_every_view_where_the_first_is_uncertain(imagenet_run, tiny_multilabel):
    from cxr.model.inference import predict_outputs
    from cxr.bundle.saved_model import SavedModel
    from cxr.bundle.views_on_demand import ViewsOnDemand

    images = sample_dataset(64).images
    model = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
    assert len(model.test_time_scales) == 2
    every_view = predict_outputs(model.predictor(), images)
    first, others = model.view_predictors()
    alone = predict_outputs(first, images)
    # the population check's features read the image as it is, in both
    assert np.abs(alone[:, 2:] - every_view[:, 2:]).max() < 1e-5
    task = model.task
    assert np.abs(predict_outputs(ViewsOnDemand(first, others, task, -1), images) - every_view).max() < 1e-5
    assert np.array_equal(predict_outputs(ViewsOnDemand(first, others, task, 1), images), alone)
    margin = float(np.median(1 - alone[:, :2].max(axis=1)))  # half the images need the other view
    need = task.uncertain(alone[:, :2], margin)
    assert 0 < need.sum() < len(images)
    served = predict_outputs(ViewsOnDemand(first, others, task, margin), images)
    assert np.abs(served[need] - every_view[need]).max() < 1e-5
    assert np.array_equal(served[~need], alone[~need])

    # sigmoid outputs, one per finding, add up too
    findings = SavedModel.load(tiny_multilabel[0] / "models" / "model.h5", "float32")
    small = sample_dataset(32).images[:12]
    first, others = findings.view_predictors()
    assert findings.task.multi_label
    assert np.abs(predict_outputs(ViewsOnDemand(first, others, findings.task, -1), small)
                  - predict_outputs(findings.predictor(), small)).max() < 1e-5


def test_views_on_demand_are_guarded_recorded_and_served_by_predict(black_choice, imagenet_run, tmp_path,
                                                                     monkeypatch):
    from cxr.bundle import fidelity, model_card, serving, views_on_demand
    from cxr.bundle.saved_model import SavedModel

    dataset = sample_dataset(64)
    rows, y = dataset.split("val")
    # not served where, as timed, they are not faster
    with monkeypatch.context() as slower:
        slower.setattr(views_on_demand, "MIN_SPEEDUP", 1e9)
        slower.setattr(views_on_demand, "best_speedup", lambda views, share: float("inf"))
        slow = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
        slow.predictor()
        record, on_demand = views_on_demand.choose(slow.task, (*slow.view_predictors(), slow.predictor()), dataset,
                                                   slow.raw_outputs(dataset.images, rows)[0])
    assert record["margin"] is None and on_demand is None and "as fast on this machine" in record["reason"], record
    assert slow.engine == "litert" and record["rebuilt_difference"] < 1e-5
    assert [t["margin"] for t in record["trials"]] == list(views_on_demand.MARGINS)

    # where int8 fails its guard, serving.choose lets the views on demand's own guard decide (black_choice)
    model, chosen = black_choice
    record = chosen["views_on_demand"]
    assert record["margin"] in views_on_demand.MARGINS and model.engine == "litert, views on demand", record
    assert model.plan == serving.ServingPlan("float32", record["margin"], "auto")
    assert record["val_auc_every_view"] - record["val_auc_on_demand"] <= fidelity.AUC_TOLERANCE / 2
    assert record["max_calibrated_probability_difference"] <= fidelity.PROBABILITY_TOLERANCE / 2
    kept = [t["margin"] for t in record["trials"] if record["val_auc_every_view"] - t["val_auc"] <= 0.001
            and t["max_calibrated_probability_difference"] <= 0.025]
    assert record["margin"] == max(kept)  # the largest margin that passes: the fewest images with every view
    model.save(tmp_path / "models")
    saved = json.loads((tmp_path / "models" / "class_names.json").read_text())["inference"]
    assert saved["precision"] == "float32" and saved["views_on_demand"]["margin"] == record["margin"]
    card = model_card.describe(SavedModel.load(tmp_path / "models" / "model.h5"))["inference"]
    assert f"further than {record['margin']:g} from certain" in card["served"]
    assert "every view for every image" in model_card.describe(
        SavedModel.load(tmp_path / "models" / "model.h5", "float32"))["inference"]["served"]

    # a margin that sends every image to every view saves nothing, however the timing of a few images falls out
    monkeypatch.setattr(views_on_demand, "MARGINS", (-1.0,))
    everything = SavedModel.load(imagenet_run / "models" / "model.h5", "float32")
    everything.predictor()
    record, _ = views_on_demand.choose(everything.task, (*everything.view_predictors(), everything.predictor()),
                                       dataset, everything.raw_outputs(dataset.images, rows)[0])
    assert record["margin"] is None and "at most 1.00x as fast" in record["reason"], record
