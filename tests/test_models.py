import keras
import numpy as np
import pytest

from cxr.model import lite0
from cxr.errors import UserError
from cxr.model import backbones
from cxr.model.networks import (backbone_layers, build_classifier, check_frozen_layers, default_frozen_layers,
                        freeze_backbone, head_on_features, split_at_frozen_prefix, unfreeze_backbone)


def trainable_backbone_layers(model):
    return [i for i, layer in enumerate(backbone_layers(model)) if layer.trainable and layer.weights]


@pytest.mark.parametrize("backbone, total", [("efficientnetb0", 237), ("efficientnet-lite0", 157),
                                             ("test-efficientnet", 98)])
def test_phases_freeze_the_right_layers(backbone, total):
    model = build_classifier(backbone, 3, weights="none", img_size=32)
    layers = backbone_layers(model)
    assert len(layers) == total
    freeze_backbone(model)
    assert trainable_backbone_layers(model) == []
    assert [w.name for w in model.trainable_weights] == ["kernel", "bias"]  # the Dense head only

    frozen = default_frozen_layers(model, backbone)
    unfreeze_backbone(model, frozen)
    trainable = trainable_backbone_layers(model)
    assert trainable and min(trainable) == frozen
    assert not any(isinstance(layers[i], keras.layers.BatchNormalization) for i in trainable)
    # the registry names the frozen point; fine-tuning starts there
    assert layers[min(trainable)].name == backbones.get(backbone).fine_tune_from


def test_default_frozen_points_are_the_seeds_for_b0_and_block_4a_for_lite0(monkeypatch):
    """The seed froze 200 layers of an ImageNet B0, and so does cxr; Lite0 fine-tunes from block 4a, 50 layers in
    (measured in benchmarks/README.md)."""
    lite0_model = build_classifier("efficientnet-lite0", 2, weights="none", img_size=32)
    assert default_frozen_layers(lite0_model, "efficientnet-lite0") == 50
    assert backbone_layers(lite0_model)[50].name == "block4a_expand_conv"
    # An ImageNet B0 has one layer more than a bare one (Keras adds a Rescaling); build it without the download.
    from keras.src.applications import efficientnet

    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *args, **kwargs: "offline.h5")
    monkeypatch.setattr(keras.Model, "load_weights", lambda self, *args, **kwargs: None)
    b0 = build_classifier("efficientnetb0", 2, weights="imagenet", img_size=32)
    assert default_frozen_layers(b0, "efficientnetb0") == 200


def test_frozen_prefix_is_cut_at_a_block_start_and_composes_to_the_model():
    model = build_classifier("efficientnet-lite0", 2, weights="none", img_size=32)
    prefix, tail, pooled = split_at_frozen_prefix(model, 132)
    assert backbone_layers(model)[132].name == "block6c_project_conv"
    assert prefix.output.shape[1:] == model.get_layer("block6c_expand_conv").input.shape[1:]  # block 6c's input
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(tail.predict(prefix.predict(x, verbose=0), verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-6)
    assert pooled.output.shape[1:] == model.get_layer("avg_pool").output.shape[1:]
    assert split_at_frozen_prefix(model, 3) is None  # in the stem: nothing to cache


def test_head_is_gap_dropout_dense_softmax():
    model = build_classifier("efficientnet-lite0", 2, weights="none", img_size=32, dropout=0.25)
    head = model.layers[-3:]
    assert [type(layer).__name__ for layer in head] == ["GlobalAveragePooling2D", "Dropout", "Dense"]
    assert head[1].rate == 0.25 and head[2].units == 2
    probabilities = model.predict(np.full((2, 32, 32, 3), 128.0, "float32"), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # the features head shares the image model's weights
    features = keras.Model(model.input, model.get_layer("avg_pool").output).predict(np.zeros((1, 32, 32, 3)), verbose=0)
    np.testing.assert_allclose(head_on_features(model).predict(features, verbose=0),
                               model.predict(np.zeros((1, 32, 32, 3)), verbose=0), rtol=1e-4, atol=1e-6)


def test_freezing_everything_is_refused():
    model = build_classifier("efficientnet-lite0", 2, weights="none", img_size=32)
    check_frozen_layers(model, 132)
    with pytest.raises(UserError, match="leaves nothing to fine-tune"):
        check_frozen_layers(model, 200)


def test_lite0_imagenet_weights_put_the_cat_at_class_285(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    skimage_data = pytest.importorskip("skimage.data")
    cat = keras.ops.convert_to_numpy(
        keras.ops.image.resize(skimage_data.chelsea()[None].astype("float32"), (224, 224)))
    for attempt in ("converted from the .pth", "read from the cache"):
        model = lite0.load_imagenet_weights(lite0.build(include_top=True))
        probabilities = model.predict(cat, verbose=0)[0]
        assert probabilities.argmax() == 285, attempt
        assert probabilities[285] > 0.7, attempt
        assert lite0.cached_weights_path().is_file()


def test_saved_h5_keeps_the_preprocessing_inside(tmp_path):
    model = build_classifier("efficientnet-lite0", 2, weights="none", img_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    model.save(tmp_path / "model.h5")
    restored = keras.models.load_model(tmp_path / "model.h5", compile=False)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-6)


def test_offline_b0_imagenet_names_the_ways_out(monkeypatch):
    from keras.src.applications import efficientnet

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/efficientnetb0_notop.h5")

    monkeypatch.setattr(efficientnet.file_utils, "get_file", no_network)
    with pytest.raises(UserError) as error:
        build_classifier("efficientnetb0", 2, weights="imagenet", img_size=32)
    assert "--backbone efficientnet-lite0" in str(error.value) and "--weights PATH" in str(error.value)


def test_test_time_scales_average_the_logits_of_zoomed_views_and_survive_a_plain_h5_round_trip(tmp_path):
    import tensorflow as tf

    from cxr.evaluate.gradcam import heatmaps
    from cxr.model.networks import has_test_time_scales, with_test_time_scales

    keras.utils.set_random_seed(0)
    model = build_classifier("test-efficientnet", 2, weights="none", img_size=64)
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    model.compile("adam", "categorical_crossentropy")
    model.fit(x, np.eye(2)[[0, 1, 0]], epochs=1, verbose=0)  # BatchNormalization statistics away from 0 and 1
    assert with_test_time_scales(model, [1.0]) is model
    views = with_test_time_scales(model, [0.9, 1.0, 1.1])
    assert has_test_time_scales(views) and not has_test_time_scales(model)

    # 0.9: shrunk to 58 px inside a black frame (3 px each side); 1.1: the central 58 px enlarged to 64
    shrunk = tf.pad(tf.image.resize(x, (58, 58)), [[0, 0], [3, 3], [3, 3], [0, 0]])
    enlarged = tf.image.resize(x[:, 3:61, 3:61], (64, 64))
    pooled = keras.Model(model.inputs, model.get_layer("avg_pool").output)
    kernel, bias = (w.numpy() for w in model.get_layer("predictions").weights)
    logits = np.mean([pooled.predict(v, verbose=0) @ kernel + bias for v in (shrunk, x, enlarged)], axis=0)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p = views.predict(x, verbose=0)
    np.testing.assert_allclose(p, expected, atol=1e-5)
    assert not np.allclose(p, model.predict(x, verbose=0), atol=1e-3)

    views.save(tmp_path / "model.h5")
    restored = keras.models.load_model(tmp_path / "model.h5", compile=False)  # no cxr objects needed
    np.testing.assert_allclose(restored.predict(x, verbose=0), p, atol=1e-6)
    np.testing.assert_allclose(with_test_time_scales(restored, [1.0]).predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)
    # Grad-CAM explains the image as it is, as for the one-view model
    np.testing.assert_allclose(heatmaps(restored, x, [1, 0, 1]), heatmaps(model, x, [1, 0, 1]), atol=1e-5)


def test_test_time_scales_default_to_the_backbones_and_are_checked():
    from cxr.cli import build_parser, config_from_args
    from cxr.training.config import Config

    assert Config(backbone="efficientnetb0").test_time_scales == [1.0]  # B0: the seed's one view
    assert Config().test_time_scales == [0.9, 1.0]  # Lite0, the default
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--backbone", "efficientnet-lite0", "--test-time-scales",
                                               "1"])).test_time_scales == [1.0]
    with pytest.raises(UserError, match="--test-time-scales"):
        Config(test_time_scales=[0.1]).validate()


def test_the_population_taps_leave_the_outputs_as_they_are(tmp_path):
    """models.with_population_taps rebuilds a model with test-time scales: its outputs must stay the model's, in
    this process and after an .h5 round trip (a rebuild once lost the input normalisation's statistics)."""
    from cxr.model.networks import with_population_taps, with_test_time_scales

    keras.utils.set_random_seed(0)
    model = build_classifier("efficientnet-lite0", 2, weights="none", img_size=64)
    x = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    taps = backbones.population_taps("efficientnet-lite0")
    for scales in ([1.0], [0.9, 1.0]):
        views = with_test_time_scales(model, scales)
        views.save(tmp_path / "model.h5")
        restored = keras.models.load_model(tmp_path / "model.h5", compile=False)
        expected = views.predict(x, verbose=0)
        for source in (views, restored):
            outputs = with_population_taps(source, taps, scales).predict(x, verbose=0)
            np.testing.assert_allclose(outputs[:, :2], expected, atol=1e-5)
            assert outputs.shape[1] == 2 + 80 + 112 + 192 + 1280  # Lite0's blocks 4c, 5c, 6d and last feature map


def test_the_test_backbone_is_a_small_lite0_with_its_taps_and_no_imagenet_weights():
    """The suite's network: Lite0's block names and defaults at a fraction of its weights."""
    model = build_classifier("test-efficientnet", 2, weights="none", img_size=32)
    assert model.count_params() < build_classifier("efficientnet-lite0", 2, weights="none", img_size=32).count_params() / 10
    entry, lite = backbones.get("test-efficientnet"), backbones.get("efficientnet-lite0")
    assert (entry.fine_tune_from, entry.test_time_scales, entry.augment) == (lite.fine_tune_from, lite.test_time_scales,
                                                                               lite.augment)
    for tap in entry.population_taps:
        model.get_layer(tap)
    with pytest.raises(UserError, match="--weights none"):
        build_classifier("test-efficientnet", 2, weights="imagenet", img_size=32)
