"""Training as a loop over phases: phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the upper
backbone at a low learning rate. A run can start at any phase and any epoch (`TrainingRun`).

Each phase has EarlyStopping on `--monitor` (the seed's val_accuracy; best weights restored),
ReduceLROnPlateau on val_loss, ModelCheckpoint of the best full image model and TensorBoard logs.

By default no epoch runs the frozen part of the network. The backbone layers that stay frozen in both phases
(the first `--frozen-layers`, up to the start of their block) are run once per training image and augmented
view (`--feature-views`) and once per validation image; phase 1 trains the head on the pooled features of
those outputs and phase 2 trains the upper blocks and head on the outputs themselves. Frozen layers are
deterministic (BatchNormalization in inference mode), so this is the same computation as running them every
epoch, minus the repeated work; only the augmentation differs: K fixed views instead of a fresh one per epoch.
All sub-models share the image model's layers, so every checkpoint is a full image model.
"""

import math
import signal
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
from cxr.errors import UserError, warn
from cxr.litert import fast_inference
from cxr.models import freeze_backbone, unfreeze_backbone

PHASE1_CHECKPOINT = "best_feature_extractor.keras"
PHASE2_CHECKPOINT = "best_finetuned.keras"


@dataclass
class Phase:
    """One training phase: what trains, at which learning rate, and where its best model is checkpointed."""

    number: int
    trains: str  # "head": the head on a frozen backbone; "upper": the backbone past the frozen point, and the head
    learning_rate: float
    checkpoint: str  # file name in the staging folder: the phase's best full image model
    title: str  # printed when the phase starts


def default_phases(config, frozen_layers):
    """The seed's recipe: the head at --lr, then everything past `frozen_layers` at --finetune-lr."""
    head = (f"training the head on cached {config.backbone} features" if config.feature_cache
            else f"training the head on a frozen {config.backbone} (plain Keras)")
    return [Phase(1, "head", config.lr, PHASE1_CHECKPOINT, head),
            Phase(2, "upper", config.finetune_lr, PHASE2_CHECKPOINT,
                  f"fine-tuning all but the first {frozen_layers} backbone layers at lr {config.finetune_lr}")]


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
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    print(f"TensorBoard: http://localhost:{port}/ (logs in {log_dir})", flush=True)
    return server


def _die_with_parent():
    """In the TensorBoard child: be killed when the training process dies, even by kill -9 (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def class_weights(labels, num_classes, mode):
    if mode != "balanced":
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(num_classes) if c not in present}


def monitor_mode(monitor):
    return "min" if monitor == "val_loss" else "max"


def phase_callbacks(config, checkpoint_path, log_dir, checkpoint_target=None):
    mode = monitor_mode(config.monitor)
    checkpoint_args = dict(filepath=str(checkpoint_path), monitor=config.monitor, mode=mode, save_best_only=True)
    checkpoint = (CheckpointOf(checkpoint_target, **checkpoint_args) if checkpoint_target is not None
                  else keras.callbacks.ModelCheckpoint(**checkpoint_args))
    return [
        keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=max(1, config.patience // 2),
                                          min_lr=1e-7),
        checkpoint,
        keras.callbacks.TensorBoard(log_dir=str(log_dir)),
        keras.callbacks.TerminateOnNaN(),
    ]


def _epochs(history, phase, initial_epoch=0):
    keys = list(history.history)
    return [{"phase": phase, "epoch": initial_epoch + i + 1, **{k: float(history.history[k][i]) for k in keys}}
            for i in range(len(history.history[keys[0]]))]


class ImageInputs:
    """Plain Keras training: every phase runs the whole image model on freshly augmented images."""

    def __init__(self, model, dataset, config):
        self.model, self.dataset, self.config = model, dataset, config

    def for_phase(self, phase):
        """(model that trains, training tf.data, validation tf.data, steps per epoch or None)."""
        rows, _ = self.dataset.split("train")
        val_rows, _ = self.dataset.split("val")
        labels = self.dataset.labels
        train_ds = make_dataset(self.dataset.images, rows, labels[rows], self.config.batch_size, shuffle=True,
                                augment=self.config.augment, seed=self.config.seed)
        val_ds = make_dataset(self.dataset.images, val_rows, labels[val_rows], self.config.batch_size)
        return self.model, train_ds, val_ds, None


class CachedInputs:
    """The frozen prefix run once (see the module's docstring): phase "upper" trains the tail on its outputs,
    phase "head" trains the head on their pooled features. Computed when a phase first needs them."""

    def __init__(self, builder, model, parts, dataset, config, folder):
        self.builder, self.model, self.dataset, self.config = builder, model, dataset, config
        self.prefix, self.tail, self.pooled = parts
        self.folder = Path(folder)
        self._outputs = self._features = None

    def for_phase(self, phase):
        """(model that trains, training tf.data, validation tf.data, steps per epoch)."""
        if phase.trains == "head":
            (x, val_x), trainable = self.features(), self.builder.head_on_features(self.model)
        else:
            (x, val_x), trainable = self.outputs(), self.tail
        rows, _ = self.dataset.split("train")
        val_rows, _ = self.dataset.split("val")
        labels = self.dataset.labels
        view_labels = np.tile(labels[rows], (len(x) // len(rows), 1))  # K views, stacked view after view
        train_ds = make_dataset(x, np.arange(len(x)), view_labels, self.config.batch_size, shuffle=True,
                                seed=self.config.seed).repeat()
        val_ds = make_dataset(val_x, np.arange(len(val_x)), labels[val_rows], self.config.batch_size)
        # An epoch is one training set's worth of steps, drawn from all views.
        return trainable, train_ds, val_ds, math.ceil(len(rows) / self.config.batch_size)

    def outputs(self):
        """The prefix's outputs for `feature_views` augmented views of the training images, stacked view after
        view, and for the validation images (unaugmented).

        They are written to .npy files (7x7x192 float32 per image and view at 224 px) and read back a batch at
        a time, so memory stays flat however many images there are; the operating system keeps them cached when
        RAM allows. On a CPU the prefix runs in LiteRT (`litert.fast_inference`).
        """
        if self._outputs is None:
            config, dataset = self.config, self.dataset
            rows, val_rows = dataset.splits["train"], dataset.splits["val"]
            print(f"Computing the frozen layers once: {config.feature_views} augmented views of "
                  f"{len(rows)} training images and {len(val_rows)} validation images", flush=True)
            runner, _ = fast_inference(self.prefix, n_images=config.feature_views * len(rows) + len(val_rows))

            def run(name, rows, views, augment=None):
                def blocks():
                    for view in range(views):
                        ds = make_dataset(dataset.images, rows, dataset.labels[rows], config.batch_size,
                                          augment=augment, seed=config.seed + view)
                        for x, _ in ds:
                            yield runner.predict_on_batch(x)

                return write_array(self.folder / f"{name}.npy", (views * len(rows), *self.prefix.output.shape[1:]),
                                   np.float32, blocks())

            self._outputs = (run("frozen-train", rows, config.feature_views, config.augment),
                             run("frozen-val", val_rows, 1))
        return self._outputs

    def features(self):
        """Pooled features of the prefix outputs (1280 floats per image and view), also written to disk: at
        50k images two views would otherwise sit in memory while Keras' predict gathers them."""
        if self._features is None:
            def pool(arrays, name):
                ds = make_dataset(arrays, np.arange(len(arrays)), np.zeros((len(arrays), 1), np.float32),
                                  self.config.batch_size)
                return write_array(self.folder / f"{name}.npy", (len(arrays), *self.pooled.output.shape[1:]),
                                   np.float32, (self.pooled.predict_on_batch(x) for x, _ in ds))

            views, val_x = self.outputs()
            self._features = (pool(views, "pooled-train"), pool(val_x, "pooled-val"))
        return self._features


def train(model, dataset, config, run):
    """Train `model` in place through `run.phases` from `run.start_phase`; it ends with the best phase's weights.

    `run` is a `TrainingRun`: the builder, phases, frozen point and folders. The final model is the last
    phase's unless an earlier phase scored strictly better on `config.monitor` (the seed's val_accuracy).
    """
    result = TrainResult()
    parts = (run.builder.split_at_frozen_prefix(model, run.frozen_layers, config.backbone)
             if config.feature_cache else None)
    inputs = (CachedInputs(run.builder, model, parts, dataset, config, run.staging_dir) if parts
              else ImageInputs(model, dataset, config))
    targets = dataset.targets[dataset.splits["train"]]
    sign = 1 if monitor_mode(config.monitor) == "max" else -1
    scores = []  # (best monitored value, higher is better; phase number; weights) per phase run
    for phase in run.phases:
        if phase.number < run.start_phase:
            continue
        initial_epoch = run.initial_epoch if phase.number == run.start_phase else 0
        start = time.perf_counter()
        if phase.trains == "head":
            freeze_backbone(model)
        else:
            unfreeze_backbone(model, run.frozen_layers)
        trainable, train_ds, val_ds, steps = inputs.for_phase(phase)
        print(f"Phase {phase.number}: {phase.title}", flush=True)
        run.builder.compile(trainable, phase.learning_rate)
        history = trainable.fit(
            train_ds, steps_per_epoch=steps, epochs=config.epochs, initial_epoch=initial_epoch,
            validation_data=val_ds, class_weight=class_weights(targets, len(dataset.class_names), config.class_weight),
            callbacks=phase_callbacks(config, run.staging_dir / phase.checkpoint, run.log_dir / f"phase{phase.number}",
                                      checkpoint_target=model if trainable is not model else None),
            shuffle=False, verbose=2)
        if not np.isfinite(history.history["loss"][-1]):
            raise UserError(f"training diverged in phase {phase.number}: the loss became NaN at learning rate "
                            f"{phase.learning_rate:g}; lower --lr (phase 1) or --finetune-lr (phase 2)")
        result.seconds[f"phase{phase.number}_seconds"] = time.perf_counter() - start
        result.history += _epochs(history, phase.number, initial_epoch)
        scores.append((max(sign * v for v in history.history[config.monitor]), phase.number, model.get_weights()))
    best = max(scores, key=lambda s: s[:2])  # ties go to the later phase
    result.final_phase = best[1]
    if best[1] != scores[-1][1]:
        print(f"Phase {scores[-1][1]} did not beat phase {best[1]} on validation; the final model keeps phase "
              f"{best[1]}'s weights")
        model.set_weights(best[2])
    return result


@dataclass
class TrainingRun:
    """How `train` runs: the model builder, the phases, where fine-tuning starts and where files go."""

    builder: object  # models.Builder: builds and compiles every model under one scope
    phases: list  # [Phase], in order
    frozen_layers: int
    staging_dir: Path  # checkpoints and cached frozen-layer outputs, published or deleted when the run ends
    log_dir: Path  # TensorBoard logs, one subfolder per phase
    start_phase: int = 1  # a run may start at any phase...
    initial_epoch: int = 0  # ...and any epoch of it
