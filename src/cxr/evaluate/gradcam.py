"""Grad-CAM (Selvaraju et al., 2017): where in the X-ray the classifier found evidence for a class.

Works on any classifier from `models.build_classifier` (both backbones, fresh or loaded from .h5/.keras, with
or without test-time scales): the heatmap is taken at the input of the head's global average pooling, the last
convolutional feature map, of the image as it is (a model with test-time scales predicts from zoomed views too).
"""

import weakref

import numpy as np
from matplotlib import colormaps
from PIL import Image


# model -> (its feature-map model, its head): made once per model, because for a model with test-time scales
# making it calls layers anew, which would grow their graphs with every request of a long-running server
_PARTS = weakref.WeakKeyDictionary()


def _feature_map_and_head(model):
    if model not in _PARTS:
        from cxr.model.networks import feature_map_model

        _PARTS[model] = feature_map_model(model), model.get_layer("predictions")
    return _PARTS[model]


def heatmaps(model, images, class_indices, batch_size=4):
    """(N, h, w) Grad-CAM maps in [0, 1] for `images` (N, H, W, 3, 0-255), each for its own class index.

    The score explained is the class logit minus the mean logit: with a softmax head only differences between
    logits change the prediction, so this is the evidence for the class against the others. With a sigmoid
    head (multi-label) it is the finding's logit.
    """
    import tensorflow as tf

    feature_model, dense = _feature_map_and_head(model)
    kernel = tf.cast(dense.kernel, tf.float32)
    bias = tf.cast(dense.bias, tf.float32)
    independent = getattr(dense.activation, "__name__", "") == "sigmoid"
    maps = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))
        target = tf.constant(np.asarray(class_indices[start:start + batch_size]), dtype=tf.int32)
        with tf.GradientTape() as tape:
            features = tf.cast(feature_model(x, training=False), tf.float32)
            tape.watch(features)
            logits = tf.matmul(tf.reduce_mean(features, axis=[1, 2]), kernel) + bias
            # sigmoid findings are independent: a finding's evidence is its own logit
            evidence = logits if independent else logits - tf.reduce_mean(logits, axis=1, keepdims=True)
            score = tf.gather(evidence, target, axis=1, batch_dims=1)
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1)).numpy()
        peak = cam.max(axis=(1, 2), keepdims=True)
        maps.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32)


def overlay(image, heatmap, alpha=0.4):
    """The heatmap (jet colours) blended over the X-ray, as a uint8 RGB array of the image's size."""
    size = image.shape[:2][::-1]
    resized = np.asarray(Image.fromarray(np.uint8(heatmap * 255)).resize(size, Image.BILINEAR)) / 255.0
    colours = colormaps["jet"](resized)[..., :3]
    blended = (1 - alpha) * (np.asarray(image, dtype=np.float64) / 255.0) + alpha * colours
    return np.uint8(np.clip(blended, 0, 1) * 255)
