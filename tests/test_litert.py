import keras
import numpy as np
import pytest

from cxr.bundle import litert
from cxr.bundle.litert import fast_inference
from cxr.model.networks import build_classifier, split_at_frozen_prefix
from cxr.bundle.saved_model import TAPS, SavedModel


@pytest.fixture(autouse=True)
def own_cache(isolated_run, tmp_path, monkeypatch):
    """These tests look into the cache: each starts with an empty one of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    return build_classifier("test-efficientnet", 2, weights="none", img_size=32)


def test_litert_gives_keras_numbers_for_any_batch_length(model):
    predictor, engine = fast_inference(model)
    assert engine == "litert"
    x = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3)).astype(np.float32)  # not a multiple of 8
    np.testing.assert_allclose(predictor.predict_on_batch(x), model.predict_on_batch(x), atol=1e-5)
    assert predictor.predict_on_batch(x[:0]).shape == (0, 2)
    assert predictor.output_shape == model.output_shape


def test_head_bias_correction_takes_back_a_shift_in_the_logits():
    """A conversion whose head answers one logit off (as int8's accumulated rounding leaves it) is moved back to
    Keras' answers by `head_bias_corrected`, measured on the images it is given."""
    model = build_classifier("test-efficientnet", 2, weights="none", img_size=32)
    head = model.get_layer("predictions")
    head.set_weights([head.get_weights()[0], np.float32([0.2, -0.2])])  # a trained head's bias is not all zeros
    x = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)
    shifted = litert.moved_head_bias(litert.to_flatbuffer(model), np.float32([0, 1]))
    expected = model.predict_on_batch(x.astype(np.float32))
    assert np.abs(litert.LiteRTModel(shifted).predict_on_batch(x) - expected).max() > 0.05
    corrected = litert.head_bias_corrected(shifted, model, x)
    np.testing.assert_allclose(litert.LiteRTModel(corrected).predict_on_batch(x), expected, atol=1e-4)


def test_few_images_are_not_worth_a_conversion(model, monkeypatch):
    converted = []
    monkeypatch.setattr(litert, "to_flatbuffer", converted.append)  # fast_inference would swallow an exception
    assert fast_inference(model, n_images=litert.MIN_IMAGES_TO_CONVERT - 1) == (model, "keras")
    assert not converted


def test_a_model_trained_in_mixed_precision_stays_in_keras(tmp_path, monkeypatch):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    build_classifier("test-efficientnet", 2, weights="none", img_size=32).save(tmp_path / "mixed.keras")
    keras.mixed_precision.set_global_policy("float32")  # as in `cxr predict`
    loaded = keras.models.load_model(tmp_path / "mixed.keras", compile=False)
    converted = []
    monkeypatch.setattr(litert, "to_flatbuffer", converted.append)
    assert fast_inference(loaded) == (loaded, "keras")
    assert not converted


def test_frozen_prefix_runs_in_litert(model):
    prefix = split_at_frozen_prefix(model, 60)[0]
    predictor, engine = fast_inference(prefix)
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    assert engine == "litert"
    np.testing.assert_allclose(predictor.predict_on_batch(x), prefix.predict_on_batch(x), atol=1e-4)


def test_conversion_is_cached_by_model_file(model, tmp_path, monkeypatch):
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    expected = fast_inference(model, model_path)[0].predict_on_batch(x)
    assert len(list((tmp_path / "cache" / "cxr" / "litert").glob("model-*.tflite"))) == 1

    def no_conversion(_):
        raise AssertionError("converted again")
    convert = litert.to_flatbuffer
    monkeypatch.setattr(litert, "to_flatbuffer", no_conversion)
    assert fast_inference(model, model_path, n_images=1)[1] == "litert"  # converted already: always worth it
    monkeypatch.setattr(litert, "to_flatbuffer", convert)

    (tmp_path / "class_names.json").write_text('{"class_names": ["A", "B"], "backbone": "test-efficientnet"}')
    SavedModel.load(model_path).predictor()  # the model with the population check's taps, converted and cached
    tapped = tmp_path / "cache" / "cxr" / "litert"
    assert len(list(tapped.glob(f"model-*-{TAPS}.tflite"))) == 1

    def no_keras(*args, **kwargs):
        raise AssertionError("loaded the Keras model")
    with monkeypatch.context() as patched:
        patched.setattr(keras.models, "load_model", no_keras)
        patched.setattr(litert, "to_flatbuffer", no_conversion)
        saved = SavedModel.load(model_path)
        predictor = saved.predictor()  # start-up without Keras
    assert saved.engine == "litert" and predictor.input_shape == (None, 32, 32, 3)
    np.testing.assert_allclose(saved.raw_probabilities(x), expected, atol=1e-5)

    keras.models.clone_model(model).save(model_path)  # new weights: a new key, never the old conversion
    SavedModel.load(model_path).predictor()
    assert len(list(tapped.glob(f"model-*-{TAPS}.tflite"))) == 2


def test_unconvertible_model_falls_back_to_keras(model, monkeypatch, capsys):
    def fail(_):
        raise ValueError("op not supported\nlong details")
    monkeypatch.setattr(litert, "to_flatbuffer", fail)
    predictor, engine = fast_inference(model)
    assert (predictor, engine) == (model, "keras")
    assert "LiteRT could not run the model (op not supported); running it in Keras" in capsys.readouterr().err


def test_a_damaged_cached_conversion_is_rebuilt(model, tmp_path, capsys):
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    (tmp_path / "class_names.json").write_text('{"class_names": ["A", "B"], "backbone": "test-efficientnet"}')
    cached = litert.cache_path(model_path, tag=f"2-{TAPS}")  # the conversion as a model of 2 classes
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not a flatbuffer")
    saved = SavedModel.load(model_path)
    saved.predictor()
    assert saved.engine == "litert" and "damaged LiteRT conversion" in capsys.readouterr().err
    assert litert.cached_conversion(model_path, tag=f"2-{TAPS}") is not None  # replaced by a good one


def test_the_conversion_made_in_training_is_cached_for_the_saved_model_file(model, tmp_path, monkeypatch):
    """Issue 46: the first `cxr predict` of a new model waited 43-59 s for the conversion training had already
    made."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    trained = SavedModel.from_keras(model, ["NORMAL", "PNEUMONIA"], 32, "test-efficientnet")
    trained.predictor(n_images=10_000)  # as training converts it, before the model has a file
    assert trained.engine == "litert"
    path = trained.save(tmp_path / "models")

    def no_conversion(_):
        raise AssertionError("converted again")
    monkeypatch.setattr(litert, "to_flatbuffer", no_conversion)
    loaded = SavedModel.load(path)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    assert loaded.predictor() is not None and loaded.engine == "litert"  # the cached one: no conversion
    np.testing.assert_allclose(loaded.raw_outputs(x)[0], trained.raw_outputs(x)[0], atol=1e-6)
