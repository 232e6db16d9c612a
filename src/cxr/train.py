"""Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the upper backbone at a low learning rate.

Each phase has EarlyStopping on val_accuracy (best weights restored), ReduceLROnPlateau on val_loss,
ModelCheckpoint of the best full image model and TensorBoard logs.

By default no epoch runs the frozen part of the network. The backbone layers that stay frozen in both phases
(the first `--frozen-layers`, up to the start of their block) are run once per training image and augmented
view (`--feature-views`) and once per validation image; phase 1 trains the head on the pooled features of
those outputs and phase 2 trains the upper blocks and head on the outputs themselves. Frozen layers are
deterministic (BatchNormalization in inference mode), so this is the same computation as running them every
epoch, minus the repeated work; only the augmentation differs: K fixed views instead of a fresh one per epoch.
All sub-models share the image model's layers, so every checkpoint is a full image model.
"""

import math
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from cxr.data.pipeline import make_dataset, write_array
from cxr.errors import warn
from cxr.litert import fast_inference
from cxr.models import backbone_layers, compile_model, freeze_backbone, head_on_features, unfreeze_backbone

PHASE1_CHECKPOINT = "best_feature_extractor.keras"
PHASE2_CHECKPOINT = "best_finetuned.keras"


@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # one dict per epoch, with its phase
    seconds: dict = field(default_factory=dict)  # phase1_seconds, phase2_seconds
    final_phase: int = 2


class CheckpointOf(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves `target` while another model that shares its layers trains."""

    def __init__(self, target, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._target = target

    def set_model(self, model):
        super().set_model(self._target)


def start_tensorboard(log_dir, port):
    """Serve TensorBoard on localhost:`port` in a child process; warn and return None if the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            warn(f"port {port} is in use; training goes on without TensorBoard (pick another --port)")
            return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"TensorBoard: http://localhost:{port}/ (logs in {log_dir})", flush=True)
    return server


def class_weights(labels, num_classes, mode):
    if mode != "balanced":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(num_classes) if c not in present}


def phase_callbacks(config, checkpoint_path, log_dir, checkpoint_target=None):
    checkpoint_args = dict(filepath=str(checkpoint_path), monitor="val_accuracy", mode="max", save_best_only=True)
    checkpoint = (CheckpointOf(checkpoint_target, **checkpoint_args) if checkpoint_target is not None
                  else keras.callbacks.ModelCheckpoint(**checkpoint_args))
    return [
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=max(1, config.patience // 2),
                                          min_lr=1e-7),
        checkpoint,
        keras.callbacks.TensorBoard(log_dir=str(log_dir)),
    ]


def _epochs(history, phase):
    keys = list(history.history)
    return [{"phase": phase, "epoch": i + 1, **{k: float(history.history[k][i]) for k in keys}}
            for i in range(len(history.history[keys[0]]))]


def split_at_frozen_prefix(model, frozen_layers):
    """(prefix, tail, pooled) models cut at the input of the backbone block that holds the first fine-tuned layer.

    Everything in the prefix stays frozen in both phases (BatchNormalization in inference mode), so its output
    for an image never changes and can be computed once. Returns None when the cut would fall in the stem.
    """
    layers = backbone_layers(model)
    if frozen_layers >= len(layers) or not layers[frozen_layers].name.startswith("block"):
        return None
    block = layers[frozen_layers].name.split("_")[0] + "_"
    cut = next(layer for layer in layers if layer.name.startswith(block)).input
    return (keras.Model(model.input, cut, name="frozen_prefix"), keras.Model(cut, model.output, name="tail"),
            keras.Model(cut, model.get_layer("avg_pool").output, name="tail_features"))


def frozen_outputs(prefix, images, data, num_classes, config, folder):
    """The prefix's outputs for `feature_views` augmented views of the training images, stacked view after view,
    and for the validation images (unaugmented).

    They are written to .npy files in `folder` (7x7x192 float32, 38 KB per image and view at 224 px) and read
    back a batch at a time, so memory stays flat however many images there are; the operating system keeps
    them cached when RAM allows.
    On a CPU the prefix runs in LiteRT, about three times faster than in Keras.
    """
    runner, _ = fast_inference(prefix, n_images=config.feature_views * len(data["train"][0]) + len(data["val"][0]))

    def run(name, rows, labels, views, augment):
        def blocks():
            for view in range(views):
                ds = make_dataset(images, rows, labels, num_classes, config.batch_size, augment=augment,
                                  seed=config.seed + view)
                for x, _ in ds:
                    yield runner.predict_on_batch(x)

        return write_array(Path(folder) / f"{name}.npy", (views * len(rows), *prefix.output.shape[1:]), np.float32,
                           blocks())

    return (run("frozen-train", *data["train"], config.feature_views, True),
            run("frozen-val", *data["val"], 1, False))


def pool(pooled, arrays, labels, num_classes, config, path):
    """Pooled features of cached prefix outputs, written to `path` (1280 floats per image and view: small, but
    at 50k images two views would hold 0.7 GB in memory while Keras' predict gathers them)."""
    ds = make_dataset(arrays, np.arange(len(arrays)), labels, num_classes, config.batch_size)
    return write_array(path, (len(arrays), *pooled.output.shape[1:]), np.float32,
                       (pooled.predict_on_batch(x) for x, _ in ds))


def fit_arrays(trainable, views, labels, val_x, val_labels, num_classes, config, learning_rate, checkpoint_path,
               log_dir, checkpoint_target):
    """One phase on precomputed inputs (`views`: K views of each training image, stacked view after view).

    An epoch is one training set's worth of steps, drawn from all views.
    """
    view_labels = np.tile(labels, len(views) // len(labels))
    train_ds = make_dataset(views, np.arange(len(views)), view_labels, num_classes, config.batch_size, shuffle=True,
                            seed=config.seed).repeat()
    val_ds = make_dataset(val_x, np.arange(len(val_x)), val_labels, num_classes, config.batch_size)
    compile_model(trainable, learning_rate)
    return trainable.fit(
        train_ds, steps_per_epoch=math.ceil(len(labels) / config.batch_size),
        epochs=config.epochs, validation_data=val_ds,
        class_weight=class_weights(labels, num_classes, config.class_weight),
        callbacks=phase_callbacks(config, checkpoint_path, log_dir, checkpoint_target=checkpoint_target),
        shuffle=False, verbose=2,
    )


def fit_images(model, images, data, num_classes, config, checkpoint_path, log_dir):
    """One phase of plain Keras training on augmented images."""
    rows, labels = data["train"]
    train_ds = make_dataset(images, rows, labels, num_classes, config.batch_size, shuffle=True, augment=True,
                            seed=config.seed)
    val_ds = make_dataset(images, *data["val"], num_classes, config.batch_size)
    return model.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                     class_weight=class_weights(labels, num_classes, config.class_weight),
                     callbacks=phase_callbacks(config, checkpoint_path, log_dir), shuffle=False, verbose=2)


def train(model, images, data, num_classes, config, frozen_layers, staging_dir, log_dir):
    """Run both phases on `model` in place; the model ends with the better phase's best weights."""
    result = TrainResult()
    staging_dir, log_dir = Path(staging_dir), Path(log_dir)
    split = split_at_frozen_prefix(model, frozen_layers) if config.feature_cache else None
    labels, val_labels = data["train"][1], data["val"][1]
    freeze_backbone(model)

    start = time.perf_counter()
    if split:
        print(f"Computing the frozen layers once: {config.feature_views} augmented views of "
              f"{len(labels)} training images and {len(val_labels)} validation images", flush=True)
        prefix, tail, pooled = split
        views, val_x = frozen_outputs(prefix, images, data, num_classes, config, staging_dir)
        features = pool(pooled, views, np.tile(labels, config.feature_views), num_classes, config,
                        staging_dir / "pooled-train.npy")
        val_features = pool(pooled, val_x, val_labels, num_classes, config, staging_dir / "pooled-val.npy")
        print(f"Phase 1: training the head on cached {config.backbone} features", flush=True)
        history = fit_arrays(head_on_features(model), features, labels, val_features, val_labels, num_classes,
                             config, config.lr, staging_dir / PHASE1_CHECKPOINT, log_dir / "phase1", model)
    else:
        print(f"Phase 1: training the head on a frozen {config.backbone} (plain Keras)", flush=True)
        compile_model(model, config.lr)
        history = fit_images(model, images, data, num_classes, config, staging_dir / PHASE1_CHECKPOINT,
                             log_dir / "phase1")
    result.seconds["phase1_seconds"] = time.perf_counter() - start
    result.history += _epochs(history, 1)
    phase1_best = max(history.history["val_accuracy"])
    phase1_weights = model.get_weights()

    print(f"Phase 2: fine-tuning all but the first {frozen_layers} backbone layers at lr {config.finetune_lr}",
          flush=True)
    start = time.perf_counter()
    unfreeze_backbone(model, frozen_layers)
    if split:
        history = fit_arrays(tail, views, labels, val_x, val_labels, num_classes, config, config.finetune_lr,
                             staging_dir / PHASE2_CHECKPOINT, log_dir / "phase2", model)
    else:
        compile_model(model, config.finetune_lr)
        history = fit_images(model, images, data, num_classes, config, staging_dir / PHASE2_CHECKPOINT,
                             log_dir / "phase2")
    result.seconds["phase2_seconds"] = time.perf_counter() - start
    result.history += _epochs(history, 2)
    if max(history.history["val_accuracy"]) < phase1_best:
        print("Fine-tuning did not beat phase 1 on validation; the final model keeps phase 1's weights")
        model.set_weights(phase1_weights)
        result.final_phase = 1
    return result
