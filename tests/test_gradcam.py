"""Grad-CAM against the closed form it has for a GAP + Dense head, and flip TTA against its definition."""

import keras
import numpy as np
import pytest

from cxr.evaluate import gradcam
from cxr.model.inference import predict_outputs
from cxr.model.networks import build_classifier


@pytest.mark.parametrize("backbone", ["efficientnetb0", "efficientnet-lite0"])
def test_gradcam_equals_class_activation_map_for_a_pooled_dense_head(backbone):
    keras.utils.set_random_seed(0)
    model = build_classifier(backbone, 2, weights="none", img_size=64)
    images = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    maps = gradcam.heatmaps(model, images, [1, 0, 1])
    assert maps.shape == (3, 2, 2) and maps.min() >= 0 and maps.max() <= 1

    # With GAP -> Dense, Grad-CAM's channel weights are the centred Dense weights of the class (over h*w), so the
    # map is relu(sum_k A_k (W_kc - mean_j W_kj)), normalised to a peak of 1.
    features = keras.Model(model.inputs, model.get_layer("avg_pool").input).predict(images, verbose=0)
    kernel = model.get_layer("predictions").kernel.numpy()
    centred = kernel - kernel.mean(axis=1, keepdims=True)
    for i, c in enumerate([1, 0, 1]):
        cam = np.maximum(features[i] @ centred[:, c], 0)
        expected = cam / cam.max() if cam.max() > 0 else cam
        np.testing.assert_allclose(maps[i], expected, atol=1e-4)


def test_overlay_keeps_the_image_size_and_colours_hot_regions():
    image = np.full((40, 40, 3), 128, np.uint8)
    heatmap = np.array([[0.0, 1.0], [0.0, 0.0]])
    out = gradcam.overlay(image, heatmap)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert out[2, 37, 0] > out[37, 2, 0]  # top right is hot (red), bottom left cold (blue)


def test_tta_averages_the_image_and_its_mirror():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    images = np.random.default_rng(1).integers(0, 255, (5, 6, 6, 3), dtype=np.uint8)
    plain = predict_outputs(model, images, batch_size=2)
    mirrored = predict_outputs(model, images[:, :, ::-1], batch_size=2)
    tta = predict_outputs(model, images, batch_size=2, tta=True)
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(plain, mirrored)
    np.testing.assert_allclose(predict_outputs(model, images, rows=[4, 0]), plain[[4, 0]], atol=1e-6)
