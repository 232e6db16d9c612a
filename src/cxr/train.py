"""Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the upper backbone at a low learning rate.

Each phase has EarlyStopping on val_accuracy (best weights restored), ReduceLROnPlateau on val_loss,
ModelCheckpoint of the best full image model and TensorBoard logs.

By default phase 1 never runs the frozen backbone in its epochs: the backbone's pooled features are computed
once per training image and augmented view (`feature_views`) and once per validation image, and the head
trains on those. The head layers are shared with the image model, so its checkpoint is a full image model.
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
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from cxr.data.pipeline import make_dataset
from cxr.errors import warn
from cxr.models import (compile_model, feature_extractor, freeze_backbone, head_on_features,
                         unfreeze_backbone)

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


def _one_hot(labels, num_classes):
    return np.eye(num_classes, dtype=np.float32)[labels]


def compute_features(extractor, images, rows, labels, num_classes, config, augment, seed):
    ds = make_dataset(images, rows, labels, num_classes, config.batch_size, augment=augment, seed=seed)
    return extractor.predict(ds.map(lambda x, y: x), verbose=0)


def train_head_on_features(model, images, data, num_classes, config, staging_dir, log_dir):
    """Phase 1 on cached pooled features: one backbone pass per training view and per validation image."""
    extractor = feature_extractor(model)
    rows, labels = data["train"]
    views = [compute_features(extractor, images, rows, labels, num_classes, config, augment=True, seed=config.seed + v)
             for v in range(config.feature_views)]
    val_rows, val_labels = data["val"]
    val_features = compute_features(extractor, images, val_rows, val_labels, num_classes, config, False, config.seed)

    train_ds = (tf.data.Dataset.from_tensor_slices((np.concatenate(views), np.tile(_one_hot(labels, num_classes),
                                                                                  (len(views), 1))))
                .shuffle(len(labels) * len(views), seed=config.seed).repeat().batch(config.batch_size))
    head = compile_model(head_on_features(model), config.lr)
    return head.fit(
        train_ds, steps_per_epoch=math.ceil(len(labels) / config.batch_size), epochs=config.epochs,
        validation_data=(val_features, _one_hot(val_labels, num_classes)),
        class_weight=class_weights(labels, num_classes, config.class_weight),
        callbacks=phase_callbacks(config, Path(staging_dir) / PHASE1_CHECKPOINT, Path(log_dir) / "phase1",
                                  checkpoint_target=model),
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

    print(f"Phase 1: training the head on a frozen {config.backbone} "
          f"({'cached features, ' + str(config.feature_views) + ' augmented views' if config.feature_cache else 'plain Keras'})",
          flush=True)
    start = time.perf_counter()
    freeze_backbone(model)
    if config.feature_cache:
        history = train_head_on_features(model, images, data, num_classes, config, staging_dir, log_dir)
    else:
        compile_model(model, config.lr)
        history = fit_images(model, images, data, num_classes, config, Path(staging_dir) / PHASE1_CHECKPOINT,
                             Path(log_dir) / "phase1")
    result.seconds["phase1_seconds"] = time.perf_counter() - start
    result.history += _epochs(history, 1)
    phase1_best = max(history.history["val_accuracy"])
    phase1_weights = model.get_weights()

    print(f"Phase 2: fine-tuning all but the first {frozen_layers} backbone layers at lr {config.finetune_lr}", flush=True)
    start = time.perf_counter()
    unfreeze_backbone(model, frozen_layers)
    compile_model(model, config.finetune_lr)
    history = fit_images(model, images, data, num_classes, config, Path(staging_dir) / PHASE2_CHECKPOINT,
                         Path(log_dir) / "phase2")
    result.seconds["phase2_seconds"] = time.perf_counter() - start
    result.history += _epochs(history, 2)
    if max(history.history["val_accuracy"]) < phase1_best:
        print("Fine-tuning did not beat phase 1 on validation; the final model keeps phase 1's weights")
        model.set_weights(phase1_weights)
        result.final_phase = 1
    return result
