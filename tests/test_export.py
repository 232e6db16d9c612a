"""`cxr export`: each format loaded in its own runtime gives `cxr predict`'s calibrated probabilities on real
X-rays."""

import json

import numpy as np
import pytest

from cxr.cli import main
from cxr.data.decode import decode_image
from tests.conftest import SAMPLE

XRAYS = sorted((SAMPLE / "NORMAL").iterdir())[:3] + sorted((SAMPLE / "PNEUMONIA").iterdir())[:3]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("export")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--model", str(tiny_run / "models/model.h5"), "--format", "savedmodel", "tflite",
                     "onnx", "--output-dir", str(out)]) == 0
    # each file with what it gives
    lines = printed.getvalue().splitlines()
    assert len(lines) == 4 and all("calibrated probabilities of NORMAL, PNEUMONIA" in line for line in lines[:3])
    assert lines[3].startswith(f"{out / 'model-card.json'}: the model card: the decision rule; the threshold")
    return out


@pytest.fixture(scope="module")
def images_and_keras(tiny_run):
    """Six real X-rays, and the probabilities `cxr predict` gives them (calibrated; the temperature is not 1)."""
    from cxr.bundle.saved_model import SavedModel

    images = np.stack([decode_image(f, 32) for f in XRAYS]).astype(np.float32)
    model = SavedModel.load(tiny_run / "models/model.h5", "float32")
    assert abs(model.operating_point["temperature"] - 1) > 0.01
    calibrated, _ = model.predict(images)
    raw = model.keras_model.predict_on_batch(images)
    assert np.abs(calibrated - raw).max() > 1e-3  # so that an export without the calibration fails
    return images, calibrated


def test_savedmodel_serving_signature_takes_raw_images(exported, images_and_keras):
    import tensorflow as tf

    images, expected = images_and_keras
    signature = tf.saved_model.load(str(exported / "saved_model")).signatures["serving_default"]
    got = signature(image=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_tflite_runs_in_litert(exported, images_and_keras):
    from ai_edge_litert.interpreter import Interpreter

    images, expected = images_and_keras
    card = json.loads((exported / "model-card.json").read_text())["exports"]["tflite"]
    interpreter = Interpreter(model_path=str(exported / card["path"]))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert (source["name"], target["name"]) == (card["input_name"], card["output_name"])
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], images)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(target["index"]), expected, atol=1e-4)


def test_onnx_runs_in_onnxruntime(exported, images_and_keras):
    import onnx
    import onnxruntime

    images, expected = images_and_keras
    card = json.loads((exported / "model-card.json").read_text())["exports"]["onnx"]
    assert {(o.domain, o.version) for o in onnx.load(str(exported / "model.onnx")).opset_import} >= {("", card["opset"])}
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [card["input_name"]]
    got = session.run([card["output_name"]], {card["input_name"]: images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_model_card_says_what_a_deployment_needs(exported, tiny_run):
    card = json.loads((exported / "model-card.json").read_text())
    info = json.loads((tiny_run / "models/class_names.json").read_text())
    summary = json.loads((tiny_run / "reports/summary.json").read_text())
    assert card["input"] == {"shape": [None, 32, 32, 3], "dtype": "float32", "value_range": [0, 255],
                             "channel_order": "RGB", "preprocessing": card["input"]["preprocessing"]}
    assert card["outputs"]["class_names"] == info["class_names"] and card["outputs"]["activation"] == "softmax"
    assert card["outputs"]["calibration"].startswith("inside the savedmodel, tflite and onnx files")
    # the population check is not in the files, and the card says so rather than naming population.npz
    assert "file" not in card["population_check"] and "runs in cxr" in card["population_check"]["exports"]
    assert card["operating_point"]["threshold"] == info["threshold"] and card["model_sha256"] == info["model_sha256"]
    assert card["training"]["counts"] == summary["counts"] and card["training"]["metrics"]["auc_roc"] == summary["metrics"]["auc_roc"]
    assert card["intended_use"] and card["limits"] and card["versions"]["cxr"]
    assert set(card["exports"]) == {"savedmodel", "tflite", "onnx"}
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no work folders left behind


def test_export_adds_to_its_own_folder_and_refuses_another_models(exported, tiny_run, tmp_path, capsys):
    model = str(tiny_run / "models/model.h5")
    (exported / ".export-killed").mkdir()  # what a killed export leaves behind
    assert main(["export", "--model", model, "--format", "tflite", "--output-dir", str(exported)]) == 0
    assert not (exported / ".export-killed").exists()
    assert set(json.loads((exported / "model-card.json").read_text())["exports"]) == {"savedmodel", "tflite", "onnx"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "model-card.json").write_text(json.dumps({"model_sha256": "another"}))
    assert main(["export", "--model", model, "--format", "tflite", "--output-dir", str(other)]) == 2
    assert "export of another model" in capsys.readouterr().err
    assert not (other / "model.tflite").exists()


def test_the_exported_model_averages_the_zoomed_views_of_the_saved_one(exported):
    card = json.loads((exported / "model-card.json").read_text())
    assert card["test_time_scales"] == [0.9, 1.0]  # Lite0's default, recorded in class_names.json
    assert "averages 2 views of each image" in card["input"]["preprocessing"]
