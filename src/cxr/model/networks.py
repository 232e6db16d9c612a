"""The classifier, which layers train in each phase, and the one place where a run builds and compiles models.

Every model here takes raw RGB images with values 0-255: the backbones carry their own preprocessing, so a
saved model needs nothing but `predict`. The classifier is one flat functional model (backbone layers first,
then the head): a nested backbone would lose its input normalisation statistics in a `.h5` round trip.
The model a run saves may average zoomed views of each image (`with_test_time_scales`): the same layers, the
part past the input normalisation nested once and run on every view.
What differs between backbones lives in the registry, `backbones`.
"""

import contextlib
from pathlib import Path

import keras

from cxr.model import backbones
from cxr.errors import UserError


class Builder:
    """Builds and compiles every model and sub-model of a run, inside `scope()`: the tf.distribute strategy's
    (`distribute.make_strategy`), so that every variable and optimizer slot of a run is created under it, or
    the default scope without one.
    """

    def __init__(self, strategy=None, weight_decay=0.0, label_smoothing=0.0, multi_label=False, positive_weights=None):
        self.strategy = strategy
        self.weight_decay, self.label_smoothing = weight_decay, label_smoothing
        self.multi_label, self.positive_weights = multi_label, positive_weights

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def classifier(self, backbone_name, num_classes, weights="imagenet", img_size=224, dropout=0.25):
        with self.scope():
            return build_classifier(backbone_name, num_classes, weights, img_size, dropout, self.multi_label)

    def split_at_frozen_prefix(self, model, frozen_layers, backbone_name):
        with self.scope():
            return split_at_frozen_prefix(model, frozen_layers, backbones.get(backbone_name).block_of)

    def head_on_features(self, model):
        with self.scope():
            return head_on_features(model)

    def compile(self, model, learning_rate):
        with self.scope():
            return compile_model(model, learning_rate, self.weight_decay, self.label_smoothing, self.multi_label,
                                 self.positive_weights)


def build_backbone(name, weights="imagenet", img_size=224, input_tensor=None):
    """The convolutional part of `name` (no pooling, no top), with `weights`: imagenet, none or a file path."""
    entry = backbones.get(name)
    shape = (img_size, img_size, 3)
    build = entry.build_imagenet if weights == "imagenet" else entry.build
    backbone = build(shape, input_tensor)
    if weights not in ("imagenet", "none"):
        try:
            backbone.load_weights(Path(weights))
        except Exception as error:
            raise UserError(f"{weights}: could not load weights into {name} ({str(error).splitlines()[0][:160]}); "
                            "give a weights file saved from the same backbone without its top") from None
    return backbone


def build_classifier(backbone_name, num_classes, weights="imagenet", img_size=224, dropout=0.25, multi_label=False):
    """Image model: backbone -> GlobalAveragePooling2D -> Dropout -> Dense (float32 output): softmax over
    exclusive classes, or one sigmoid per finding for a `multi_label` model."""
    inputs = keras.Input(shape=(img_size, img_size, 3), name="image")
    backbone = build_backbone(backbone_name, weights, img_size, input_tensor=inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="sigmoid" if multi_label else "softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"cxr_{backbone.name}")


FEATURE_MAP = "feature_map"  # the backbone past its input normalisation, in a model with test-time scales
VIEW = "view_"  # the name prefix of the layers that make the views


def with_test_time_scales(model, scales):
    """The classifier `model` predicting from several zoomed views of each image: the softmax of the views' mean
    logits (their pooled features are averaged before the Dense head, which is linear).

    Each scale below 1 shrinks the image inside a black frame (a wider field of view), above 1 enlarges its
    centre, 1 is the image as it is. Built from stock Keras layers, so the saved file loads with plain
    `keras.models.load_model`, converts to LiteRT and exports like a one-view model; the backbone's input
    normalisation stays in the outer model (nested, it would lose its statistics in a .h5 round trip).
    `model` may itself have test-time scales; a one-view model asked for the scales (1,) is returned as it is.
    Input and output as `model`'s: (batch, side, side, 3) 0-255 -> (batch, classes).
    """
    if list(scales) == [1.0] and not has_test_time_scales(model):
        return model
    preprocessing, feature_map = _preprocessing_and_feature_map(model)
    side, pool = model.input.shape[1], model.get_layer("avg_pool")
    image = keras.Input(shape=model.input.shape[1:], name="image")
    pooled = [pool(feature_map(_apply(preprocessing, zoomed(image, scale, side)))) for scale in scales]
    x = keras.layers.Average(name="mean_over_views")(pooled) if len(pooled) > 1 else pooled[0]
    x = model.get_layer("head_dropout")(x)
    name = model.name.removesuffix("_multiscale")
    return keras.Model(image, model.get_layer("predictions")(x), name=name if len(pooled) == 1 else f"{name}_multiscale")


def has_test_time_scales(model):
    return FEATURE_MAP in {layer.name for layer in model.layers}


def zoomed(image, scale, side):
    """`image` (a Keras tensor of side x side images) zoomed by `scale` around its centre, same size."""
    if scale == 1:
        return image
    tag = f"{scale:g}".replace(".", "_")
    if scale < 1:
        inner = round(side * scale)
        margin = side - inner
        x = keras.layers.Resizing(inner, inner, name=f"{VIEW}shrink_{tag}")(image)
        return keras.layers.ZeroPadding2D(((margin // 2, margin - margin // 2),) * 2, name=f"{VIEW}frame_{tag}")(x)
    inner = round(side / scale)
    margin = side - inner
    x = keras.layers.Cropping2D(((margin // 2, margin - margin // 2),) * 2, name=f"{VIEW}centre_{tag}")(image)
    return keras.layers.Resizing(side, side, name=f"{VIEW}enlarge_{tag}")(x)


def _preprocessing_and_feature_map(model):
    """(the backbone's input normalisation layers, a model from their output to the last feature map)."""
    if has_test_time_scales(model):
        feature_map = model.get_layer(FEATURE_MAP)
        return [layer for layer in model.layers[1:model.layers.index(feature_map)]
                if not layer.name.startswith(VIEW)], feature_map
    layers = backbone_layers(model)
    cut = next((i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Normalization)), 0) + 1
    return layers[1:cut], keras.Model(layers[cut].input, model.get_layer("avg_pool").input, name=FEATURE_MAP)


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def with_population_taps(model, taps, scales=(1.0,)):
    """image -> [the classifier's outputs | the pooled outputs of the layers `taps` | its pooled last feature map],
    one (batch, classes + features) tensor, in one forward pass: what the population check (`cxr.model.population`)
    reads beside every prediction. `scales`: the model's test-time scales (`with_test_time_scales`); the taps
    read the image as it is (the view at scale 1, or the closest).
    """
    if not has_test_time_scales(model):
        pooled = [keras.layers.GlobalAveragePooling2D(name=f"tap_{t}")(model.get_layer(t).output) for t in taps]
        return keras.Model(model.input, keras.layers.Concatenate(name="outputs_and_taps")(
            [model.output, *pooled, model.get_layer("avg_pool").output]), name=f"{model.name}_taps")
    # Rebuilt from its config, the nested backbone's layers are outputs of its own graph (built in this process
    # from the flat classifier, they would belong to that one's)
    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    for layer in rebuilt.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # its statistics are weights: only this reads them into what it computes with
    model = rebuilt
    preprocessing, feature_map = _preprocessing_and_feature_map(model)
    tapped = keras.Model(feature_map.input, [*(feature_map.get_layer(t).output for t in taps), feature_map.output],
                         name="tapped_feature_map")
    side, pool = model.input.shape[1], model.get_layer("avg_pool")
    as_is = min(range(len(scales)), key=lambda k: abs(scales[k] - 1))
    image = keras.Input(shape=model.input.shape[1:], name="image")
    pooled, tap_features = [], []
    for k, scale in enumerate(scales):
        x = _apply(preprocessing, zoomed(image, scale, side))
        if k == as_is:
            *maps, last = tapped(x)
            tap_features = [keras.layers.GlobalAveragePooling2D(name=f"tap_{t}")(m) for t, m in zip(taps, maps)]
            pooled.append(pool(last))
        else:
            pooled.append(pool(feature_map(x)))
    x = keras.layers.Average(name="mean_over_views")(pooled) if len(pooled) > 1 else pooled[0]
    outputs = model.get_layer("predictions")(model.get_layer("head_dropout")(x))
    return keras.Model(image, keras.layers.Concatenate(name="outputs_and_taps")(
        [outputs, *tap_features, pooled[as_is]]), name=f"{model.name}_taps")


def feature_map_model(model):
    """image -> the last convolutional feature map (the input of the head's pooling) of the image as it is,
    for a classifier with or without test-time scales."""
    if not has_test_time_scales(model):
        return keras.Model(model.inputs, model.get_layer("avg_pool").input)
    preprocessing, feature_map = _preprocessing_and_feature_map(model)
    image = keras.Input(shape=model.input.shape[1:], name="image")
    return keras.Model(image, feature_map(_apply(preprocessing, image)))


def init_from(model, path):
    """Copy the backbone of another model file (a cxr model.h5 or checkpoint of the same backbone, at any image
    size and for any classes) into `model`, layer by layer in order; the head stays new. Returns how many
    layers were copied; UserError unless every backbone layer with weights has its match."""
    try:
        source = keras.models.load_model(path, compile=False)
    except Exception as error:
        raise UserError(f"--init-from {path}: could not load it ({str(error).splitlines()[0][:160]}); give a model "
                        "file written by cxr train") from None
    def flat(container):  # a model with test-time scales nests its backbone once, after the input normalisation
        for layer in container.layers:
            yield from flat(layer) if isinstance(layer, keras.Model) else [layer]

    # In order, not by name: Keras numbers the names of layers it named itself (normalization_1) per process.
    theirs = [layer for layer in flat(source) if layer.weights]
    ours = [layer for layer in backbone_layers(model) if layer.weights]
    fitting = 0
    for mine, other in zip(ours, theirs):
        if [w.shape for w in other.weights] != [w.shape for w in mine.weights]:
            break
        fitting += 1
    if fitting < len(ours):  # another backbone: a few first layers may fit, never all
        raise UserError(f"--init-from {path}: only {fitting} of this backbone's {len(ours)} layers with weights fit "
                        "it; give a model of the same --backbone")
    for mine, other in zip(ours, theirs):
        mine.set_weights(other.get_weights())
    return len(ours)


def default_frozen_layers(model, backbone_name):
    """How many backbone layers stay frozen in phase 2 by default: those before the registry's frozen point."""
    names = [layer.name for layer in backbone_layers(model)]
    return names.index(backbones.get(backbone_name).fine_tune_from)


def backbone_layers(model):
    """The backbone's layers, input layer first, in the order `--frozen-layers` counts them."""
    return model.layers[:model.layers.index(model.get_layer("avg_pool"))]


def head_on_features(model):
    """A model from pooled features to class probabilities, sharing the image model's head layers."""
    features = keras.Input(shape=model.get_layer("avg_pool").output.shape[1:], name="features")
    x = model.get_layer("head_dropout")(features)
    return keras.Model(features, model.get_layer("predictions")(x), name="head")


def split_at_frozen_prefix(model, frozen_layers, block_of=backbones.kerasapp_block):
    """(prefix, tail, pooled) models cut at the input of the backbone block that holds the first fine-tuned layer.

    Everything in the prefix stays frozen in both phases (BatchNormalization in inference mode), so its output
    for an image never changes and can be computed once. `block_of` maps a layer name to its block (the
    registry's). Returns None when the cut would fall outside the blocks (in the stem).
    """
    layers = backbone_layers(model)
    if frozen_layers >= len(layers) or block_of(layers[frozen_layers].name) is None:
        return None
    block = block_of(layers[frozen_layers].name)
    cut = next(layer for layer in layers if block_of(layer.name) == block).input
    return (keras.Model(model.input, cut, name="frozen_prefix"), keras.Model(cut, model.output, name="tail"),
            keras.Model(cut, model.get_layer("avg_pool").output, name="tail_features"))


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


def compile_model(model, learning_rate, weight_decay=0.0, label_smoothing=0.0, multi_label=False,
                  positive_weights=None):
    """Adam (AdamW with `weight_decay`) on categorical cross-entropy, with accuracy and AUC as metrics; for a
    `multi_label` model, binary cross-entropy and the mean AUC over findings, both over known labels only."""
    optimizer = (keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay) if weight_decay
                 else keras.optimizers.Adam(learning_rate))
    if multi_label:
        loss = MaskedBinaryCrossentropy(positive_weights, label_smoothing)
        metrics = [MaskedAUC(multi_label=True, num_labels=model.output_shape[-1], name="auc")]
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        metrics = ["accuracy", keras.metrics.AUC(name="auc")]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    return model


@keras.saving.register_keras_serializable(package="cxr")
class MaskedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy of (batch, findings) sigmoid outputs over the known labels: a NaN label (unknown)
    adds nothing, and each image's loss is the mean over its known findings.

    `positive_weights`: (findings,) factors on the positive term (e.g. negatives / positives per finding).
    """

    def __init__(self, positive_weights=None, label_smoothing=0.0, name="masked_binary_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.positive_weights = None if positive_weights is None else [float(w) for w in positive_weights]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_pred = ops.cast(y_pred, "float32")
        known = ops.logical_not(ops.isnan(y_true))
        y = ops.where(known, y_true, 0.0)
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
        weight = 1.0 if self.positive_weights is None else ops.convert_to_tensor(self.positive_weights, "float32")
        terms = -(weight * y * ops.log(p) + (1 - y) * ops.log(1 - p))
        known = ops.cast(known, "float32")
        return ops.sum(terms * known, axis=-1) / ops.maximum(ops.sum(known, axis=-1), 1.0)

    def get_config(self):
        return super().get_config() | {"positive_weights": self.positive_weights,
                                       "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="cxr")
class MaskedAUC(keras.metrics.AUC):
    """AUC over the known labels only (NaN: unknown, weighted 0); with multi_label=True the mean over findings."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        known = ops.logical_not(ops.isnan(y_true))
        return super().update_state(ops.where(known, y_true, 0.0), y_pred,
                                    sample_weight=ops.cast(known, "float32"))
