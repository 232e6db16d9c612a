"""Backbones, the classification head and which layers train in each phase.

Every model here takes raw RGB images with values 0-255: the backbones carry their own preprocessing, so a
saved model needs nothing but `predict`. The classifier is one flat functional model (backbone layers first,
then the head): a nested backbone would lose its input normalisation statistics in a `.h5` round trip.
"""

from pathlib import Path

import keras

from cxr import lite0
from cxr.errors import UserError

# The seed froze B0's first 200 layers, which ends inside block 6c. Lite0 has no squeeze-excitation layers,
# so the same blocks (everything before block6c_project_conv) are its first 132 layers.
DEFAULT_FROZEN_LAYERS = {"efficientnetb0": 200, "efficientnet-lite0": 132}


def build_backbone(name, weights="imagenet", img_size=224, input_tensor=None):
    """The convolutional part of `name` (no pooling, no top), with `weights`: imagenet, none or a file path."""
    shape = (img_size, img_size, 3)
    path = None if weights in ("imagenet", "none") else Path(weights)
    if name == "efficientnetb0":
        try:
            backbone = keras.applications.EfficientNetB0(
                include_top=False, weights="imagenet" if weights == "imagenet" else None, input_shape=shape,
                input_tensor=input_tensor)
        except Exception as error:  # Keras reports a failed download as a bare Exception
            raise UserError(
                f"could not download EfficientNetB0 ImageNet weights ({str(error).splitlines()[0]}); offline, use "
                "--backbone efficientnet-lite0 (weights ship with cxr) or --weights PATH to a local weights file"
            ) from None
    elif name == "efficientnet-lite0":
        backbone = lite0.build(shape, input_tensor=input_tensor)
        if weights == "imagenet":
            lite0.load_imagenet_weights(backbone)
    else:
        raise UserError(f"unknown backbone {name!r}; choose efficientnetb0 or efficientnet-lite0")
    if path is not None:
        try:
            backbone.load_weights(path)
        except Exception as error:
            raise UserError(f"{path}: could not load weights into {name} ({str(error).splitlines()[0][:160]}); "
                            "give a weights file saved from the same backbone without its top") from None
    return backbone


def build_classifier(backbone_name, num_classes, weights="imagenet", img_size=224, dropout=0.25):
    """Image model: backbone -> GlobalAveragePooling2D -> Dropout -> Dense softmax (float32 output)."""
    inputs = keras.Input(shape=(img_size, img_size, 3), name="image")
    backbone = build_backbone(backbone_name, weights, img_size, input_tensor=inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"cxr_{backbone.name}")


def backbone_layers(model):
    """The backbone's layers, input layer first, in the order `--frozen-layers` counts them."""
    return model.layers[:model.layers.index(model.get_layer("avg_pool"))]


def head_on_features(model):
    """A model from pooled features to class probabilities, sharing the image model's head layers."""
    features = keras.Input(shape=model.get_layer("avg_pool").output.shape[1:], name="features")
    x = model.get_layer("head_dropout")(features)
    return keras.Model(features, model.get_layer("predictions")(x), name="head")


def freeze_backbone(model):
    """Phase 1: only the head trains."""
    for layer in backbone_layers(model):
        layer.trainable = False


def _fine_tunable(layer):
    return bool(layer.weights) and not isinstance(layer, keras.layers.BatchNormalization)


def check_frozen_layers(model, frozen_layers):
    """Raise UserError when freezing the first `frozen_layers` layers would leave nothing to fine-tune."""
    layers = backbone_layers(model)
    if not any(_fine_tunable(layer) for layer in layers[frozen_layers:]):
        raise UserError(f"--frozen-layers {frozen_layers} leaves nothing to fine-tune: the backbone has "
                        f"{len(layers)} layers; choose a smaller number")


def unfreeze_backbone(model, frozen_layers):
    """Phase 2: the backbone trains except its first `frozen_layers` layers and every BatchNormalization layer.

    A frozen BatchNormalization layer runs in inference mode in Keras 3, so it keeps its ImageNet statistics
    instead of re-estimating them from small, differently distributed batches.
    """
    check_frozen_layers(model, frozen_layers)
    for i, layer in enumerate(backbone_layers(model)):
        layer.trainable = i >= frozen_layers and not isinstance(layer, keras.layers.BatchNormalization)


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    return model
