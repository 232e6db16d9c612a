"""SavedModel: what every command loads, checked once, with one predict."""

import json

import numpy as np
import pytest

from cxr.errors import UserError
from cxr.model.networks import build_classifier
from cxr.bundle.saved_model import SavedModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    keras_model = build_classifier("test-efficientnet", 2, weights="none", img_size=32)
    model = SavedModel.from_keras(keras_model, ["NORMAL", "PNEUMONIA"], 32, "test-efficientnet")
    model.operating_point = {"positive_class": "PNEUMONIA", "temperature": 2.0, "threshold": 0.3,
                             "method": "youden"}
    model.save(folder)
    return folder, keras_model


def images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_save_and_load_keep_everything_the_commands_need(saved):
    folder, keras_model = saved
    model = SavedModel.load(folder / "model.h5")
    assert model.class_names == ["NORMAL", "PNEUMONIA"] and model.img_size == 32
    assert model.backbone == "test-efficientnet" and model.operating_point["threshold"] == 0.3
    assert len(model.sha256) == 64 and json.loads((folder / "class_names.json").read_text())["model_sha256"] == model.sha256


def test_predict_is_temperature_scaled_and_thresholded(saved):
    folder, keras_model = saved
    model = SavedModel.load(folder / "model.h5")
    x = images()
    raw = keras_model.predict(x.astype(np.float32), verbose=0)
    probabilities, labels = model.predict(x)
    scaled = np.exp(np.log(raw) / 2.0)
    np.testing.assert_allclose(probabilities, scaled / scaled.sum(axis=1, keepdims=True), atol=1e-4)
    np.testing.assert_array_equal(labels, (probabilities[:, 1] >= 0.3).astype(int))


def test_a_model_from_another_run_is_refused(saved, tmp_path):
    folder, _ = saved
    (tmp_path / "model.h5").write_bytes((folder / "model.h5").read_bytes() + b"\0")
    (tmp_path / "class_names.json").write_text((folder / "class_names.json").read_text())
    with pytest.raises(UserError, match="hash differs"):
        SavedModel.load(tmp_path / "model.h5")


def test_output_count_must_match_the_class_names(saved, tmp_path):
    """Also when the model file's conversion is cached, as the one of 2 classes."""
    folder, _ = saved
    SavedModel.load(folder / "model.h5").predictor()
    (tmp_path / "model.h5").write_bytes((folder / "model.h5").read_bytes())
    (tmp_path / "class_names.json").write_text(json.dumps({"class_names": ["A", "B", "C"]}))
    with pytest.raises(UserError, match="2 outputs but class_names.json names 3 classes"):
        SavedModel.load(tmp_path / "model.h5").predict(images(1))


def test_a_model_saved_without_an_operating_point_uses_argmax(saved, tmp_path):
    folder, _ = saved
    (tmp_path / "model.h5").write_bytes((folder / "model.h5").read_bytes())
    (tmp_path / "class_names.json").write_text(json.dumps(["NORMAL", "PNEUMONIA"]))  # the oldest format
    model = SavedModel.load(tmp_path / "model.h5")
    assert model.operating_point == {"positive_class": "PNEUMONIA", "temperature": 1.0, "threshold": None,
                                     "method": "argmax"}
    probabilities, labels = model.predict(images())
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))


def test_the_metadata_is_versioned_and_checked_against_its_schema(saved, tiny_run, tiny_multilabel, tmp_path):
    """What training writes (two-class and multi-label) passes the shipped JSON Schema at the current version; a
    version-1 file (no version, as saved before 2026-12-07) still loads; a newer version is refused."""
    import jsonschema

    from cxr.bundle.saved_model import METADATA_VERSION, metadata_schema

    for models in (saved[0], tiny_run / "models", tiny_multilabel[0] / "models"):
        info = json.loads((models / "class_names.json").read_text())
        jsonschema.validate(info, metadata_schema())
        assert info["metadata_version"] == METADATA_VERSION == 2
    folder, _ = saved
    (tmp_path / "model.h5").write_bytes((folder / "model.h5").read_bytes())
    info = json.loads((folder / "class_names.json").read_text())
    version_1 = {k: v for k, v in info.items() if k != "metadata_version"}
    (tmp_path / "class_names.json").write_text(json.dumps(version_1))
    assert SavedModel.load(tmp_path / "model.h5").operating_point["threshold"] == 0.3
    (tmp_path / "class_names.json").write_text(json.dumps(info | {"metadata_version": 3}))
    with pytest.raises(UserError, match="metadata version 3, written by a newer cxr .*; upgrade cxr"):
        SavedModel.load(tmp_path / "model.h5")
    (tmp_path / "class_names.json").write_text(json.dumps(info | {"inference": {"precision": "int4"}}))
    with pytest.raises(UserError, match="inference must be training's serving choice"):
        SavedModel.load(tmp_path / "model.h5")


def test_the_serving_plan_is_resolved_once_from_trainings_choice_and_the_precision_asked(tmp_path):
    from dataclasses import FrozenInstanceError

    from cxr.bundle.serving import ServingPlan

    on_demand = {"precision": "float32", "reason": "int8 was not faster", "views_on_demand": {"margin": 0.01}}
    assert ServingPlan.resolve(on_demand) == ServingPlan("float32", 0.01, "auto")
    assert ServingPlan.resolve(on_demand, "float32") == ServingPlan("float32", None, "float32")  # every view
    assert ServingPlan.resolve(None) == ServingPlan("float32", None, "auto")  # trained before cxr chose
    int8 = {"precision": "int8", "reason": "passed the guard"}
    int8_file = tmp_path / "model.int8.tflite"
    assert ServingPlan.resolve(int8, "auto", (int8_file, True)) == ServingPlan("int8", None, "auto")
    assert ServingPlan.resolve(int8, "float32", (tmp_path / "model.int8.tflite", False)).precision == "float32"
    with pytest.raises(UserError, match="model.int8.tflite: not found; use the files of one training run"):
        ServingPlan.resolve(int8, "auto", (tmp_path / "model.int8.tflite", False))
    with pytest.raises(UserError, match="m.h5: no int8 conversion beside it .*not faster.*--precision float32"):
        ServingPlan.resolve(on_demand, "int8", (tmp_path / "model.int8.tflite", False), "m.h5")
    with pytest.raises(FrozenInstanceError):
        ServingPlan.resolve(on_demand).margin = None
    assert "further than 0.01 from certain" in ServingPlan.resolve(on_demand).describe(2)
    assert "every view for every image" in ServingPlan.resolve(on_demand, "float32").describe(2)


def test_other_data_is_anything_outside_the_folders_the_operating_point_came_from(tmp_path):
    from cxr.model.inference import describe_fitted_on, fitted_on

    data = tmp_path / "chest_xray"  # Kaggle layout: val and test carved from train/, a test set beside it
    point = {"positive_class": "PNEUMONIA", "temperature": 1.0, "threshold": 0.5, "method": "youden",
             "fitted_on": fitted_on(f"the validation split of {data}", data, {"val": {"NORMAL": 3, "PNEUMONIA": 4}},
                                    same_data=[data / "train"])}
    model = SavedModel({"class_names": ["NORMAL", "PNEUMONIA"], **point})
    assert not model.is_other_data(data / "train") and not model.is_other_data(data / "train" / "NORMAL")
    assert model.is_other_data(data / "external_dev") and model.is_other_data(tmp_path / "other_hospital")
    assert describe_fitted_on(model.operating_point).startswith(f"the validation split of {data} (7 images, ")
    assert SavedModel({"class_names": ["A", "B"]}).is_other_data(data / "train")  # unknown: say so
