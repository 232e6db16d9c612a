"""Training as a loop over phases: phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the upper
backbone at a low learning rate. A run can start at any phase and any epoch (`TrainingRun`).

After each epoch of a phase, `PhaseControl` decides what the seed's Keras callbacks decided: early stopping on
`--monitor` (the seed's val_accuracy; best weights restored), the learning rate cut on a val_loss plateau, and a
checkpoint of the best full image model; TensorBoard logs it. Those decisions are one plain `Progress`, so the
state a killed run resumes from (`resume`) is one checkpoint: weights, optimizer, `Progress` and the history.

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

from cxr.training import resume
from cxr.atomic import atomic_path
from cxr.data.pipeline import DiskArray, make_dataset, write_array
from cxr.errors import UserError, warn
from cxr.progress import counted, quiet
from cxr.bundle.litert import fast_inference, keras_predictor
from cxr.model.networks import freeze_backbone, unfreeze_backbone

PHASE1_CHECKPOINT = "best_feature_extractor.keras"
PHASE2_CHECKPOINT = "best_finetuned.keras"


@dataclass
class Phase:
    """One training phase: what trains, at which learning rate, and where its best model is checkpointed."""

    number: int
    trains: str  # "head": the head on a frozen backbone; "upper": the backbone past the frozen point, and the head
    learning_rate: float
    epochs: int  # at most; early stopping may end it sooner
    checkpoint: str  # file name in the staging folder: the phase's best full image model
    title: str  # printed when the phase starts


def default_phases(config, frozen_layers):
    """The seed's recipe: the head at --lr for up to --epochs, then everything past `frozen_layers` at
    --finetune-lr for up to --finetune-epochs."""
    head = (f"training the head on cached {config.backbone} features" if config.feature_cache
            else f"training the head on a frozen {config.backbone} (plain Keras)")
    return [Phase(1, "head", config.lr, config.epochs, PHASE1_CHECKPOINT, head),
            Phase(2, "upper", config.finetune_lr, config.finetune_epochs, PHASE2_CHECKPOINT,
                  f"fine-tuning all but the first {frozen_layers} backbone layers at lr {config.finetune_lr}")]


@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # one dict per epoch, with its phase
    seconds: dict = field(default_factory=dict)  # phase1_seconds, phase2_seconds
    final_phase: int = 2


PLATEAU_FACTOR, PLATEAU_MIN_DELTA, MIN_LR = 0.2, 1e-4, 1e-7  # the learning rate's cut, as the seed's ReduceLROnPlateau


@dataclass
class Progress:
    """What a phase has decided after its epochs so far: with the weights and the optimizer's state, all that a
    killed phase needs to go on (`resume` saves it as a plain dict)."""

    best: float | None = None  # the best --monitor value so far: early stopping's and the checkpoint's reference
    best_epoch: int = 0
    wait: int = 0  # epochs since the best (early stopping)
    plateau_best: float | None = None  # the lowest val_loss, by at least PLATEAU_MIN_DELTA (the learning rate's cut)
    plateau_wait: int = 0
    stopped: bool = False  # early stopping ended the phase


class PhaseControl(keras.callbacks.Callback):
    """After every epoch, what the seed's EarlyStopping (restore_best_weights), ReduceLROnPlateau and ModelCheckpoint
    (save_best_only) decided, with their defaults: early stopping on `config.monitor` after `config.patience` epochs
    without a strictly better value, the best weights put back at the end; the learning rate cut by PLATEAU_FACTOR
    (down to MIN_LR) after half as many epochs without a val_loss PLATEAU_MIN_DELTA lower; the best epoch's full
    image model saved to `checkpoint` (atomically: a full disk leaves no corrupt file). Owned here, so that the
    state is one `Progress` (and the best weights), not three callbacks' private counters.

    `image_model`: the full image model, which shares its layers with the model that trains (`self.model`: the
    head alone, or the layers past the frozen prefix); `progress` and `best_weights`: a resumed phase's."""

    def __init__(self, config, checkpoint, image_model, progress=None, best_weights=None):
        super().__init__()
        self.monitor, self.sign = config.monitor, 1 if monitor_mode(config.monitor) == "max" else -1
        self.patience, self.plateau_patience = config.patience, max(1, config.patience // 2)
        self.checkpoint, self.image_model = Path(checkpoint), image_model
        self.progress, self.best_weights = progress or Progress(), best_weights or None

    def on_epoch_end(self, epoch, logs=None):
        progress, optimizer = self.progress, self.model.optimizer
        # this epoch's learning rate, in the history as ReduceLROnPlateau put it there
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if self.best_weights is None:
            self.best_weights, progress.best_epoch = self.model.get_weights(), epoch
        progress.wait += 1
        current = float(logs[self.monitor])
        improved = progress.best is None or self.sign * current > self.sign * progress.best
        if improved:
            progress.best, progress.best_epoch, progress.wait = current, epoch, 0
            self.best_weights = self.model.get_weights()
        elif progress.wait >= self.patience and epoch > 0:
            progress.stopped = self.model.stop_training = True
        loss = float(logs["val_loss"])
        if progress.plateau_best is None or loss < progress.plateau_best - PLATEAU_MIN_DELTA:
            progress.plateau_best, progress.plateau_wait = loss, 0
        else:
            progress.plateau_wait += 1
            rate = logs["learning_rate"]
            if progress.plateau_wait >= self.plateau_patience and rate > np.float32(MIN_LR):
                optimizer.learning_rate = max(rate * PLATEAU_FACTOR, MIN_LR)
                progress.plateau_wait = 0
        if improved:
            with atomic_path(self.checkpoint) as tmp:
                self.image_model.save(tmp)

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


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


def _epochs(history, phase, initial_epoch=0):
    keys = list(history.history)
    return [{"phase": phase, "epoch": initial_epoch + i + 1, **{k: float(history.history[k][i]) for k in keys}}
            for i in range(len(history.history[keys[0]]))]


def training_order(n_rows, n_images, batch_size, epochs, seed, start_epoch=0):
    """(rows of epochs start_epoch..epochs-1, steps per epoch) for training on `n_rows` rows (images or views).

    Passes over range(n_rows), each shuffled with its own seed (seed, pass), are cut into epochs of
    ceil(n_images / batch_size) full batches: an epoch is one training set's worth of steps. Epoch e's batches
    depend on nothing but e, so a resumed run draws the batches an uninterrupted one would.
    """
    steps = math.ceil(n_images / batch_size)
    per_epoch = steps * batch_size
    passes = math.ceil(epochs * per_epoch / n_rows)
    order = np.concatenate([np.random.default_rng([seed, p]).permutation(n_rows) for p in range(passes)])
    return order[start_epoch * per_epoch:epochs * per_epoch], steps


STEP_NAMES = {"frozen-train": "Frozen layers, training views", "frozen-val": "Frozen layers, validation",
              "pooled-train": "Pooling, training views", "pooled-val": "Pooling, validation"}


def staged_array(folder, name, shape, blocks):
    """The float32 .npy array `name` in the staging folder `folder`, as a `DiskArray`: reused when a complete one
    of `shape` is there, else written (under a temporary name, renamed when complete) from the row blocks
    `blocks()` yields."""
    path = Path(folder) / f"{name}.npy"
    if path.is_file():
        array = DiskArray(path)
        if array.shape == tuple(shape):
            return array
        array.close()
    with atomic_path(path) as tmp:
        write_array(tmp, shape, np.float32, counted(blocks(), shape[0], STEP_NAMES.get(name, name))).close()
    return DiskArray(path)


class ImageInputs:
    """Plain Keras training: every phase runs the whole image model on freshly augmented images."""

    def __init__(self, model, dataset, config):
        self.model, self.dataset, self.config = model, dataset, config

    def for_phase(self, phase, initial_epoch=0):
        """(model that trains, training tf.data from `initial_epoch` on, validation tf.data, steps per epoch)."""
        config, labels = self.config, self.dataset.labels
        rows, _ = self.dataset.split("train")
        val_rows, _ = self.dataset.split("val")
        order, steps = training_order(len(rows), len(rows), config.batch_size, phase.epochs, config.seed,
                                      initial_epoch)
        train_ds = make_dataset(self.dataset.images, rows[order], labels[rows[order]], config.batch_size,
                                augment=config.augment, seed=config.seed)
        val_ds = make_dataset(self.dataset.images, val_rows, labels[val_rows], config.batch_size)
        return self.model, train_ds, val_ds, steps


class CachedInputs:
    """The frozen prefix run once (see the module's docstring): phase "upper" trains the tail on its outputs,
    phase "head" trains the head on their pooled features. Computed when a phase first needs them, and kept
    in the staging folder, where a resumed run finds them."""

    def __init__(self, builder, model, parts, dataset, config, folder):
        self.builder, self.model, self.dataset, self.config = builder, model, dataset, config
        self.prefix, self.tail, self.pooled = parts
        self.folder = Path(folder)
        self._outputs = self._features = None

    def for_phase(self, phase, initial_epoch=0):
        """(model that trains, training tf.data from `initial_epoch` on, validation tf.data, steps per epoch)."""
        if phase.trains == "head":
            (x, val_x), trainable = self.features(), self.builder.head_on_features(self.model)
        else:
            (x, val_x), trainable = self.outputs(), self.tail
        config, labels = self.config, self.dataset.labels
        rows, _ = self.dataset.split("train")
        val_rows, _ = self.dataset.split("val")
        view_labels = np.tile(labels[rows], (len(x) // len(rows), 1))  # K views, stacked view after view
        order, steps = training_order(len(x), len(rows), config.batch_size, phase.epochs, config.seed,
                                      initial_epoch)
        train_ds = make_dataset(x, order, view_labels[order], config.batch_size)
        val_ds = make_dataset(val_x, np.arange(len(val_x)), labels[val_rows], config.batch_size)
        return trainable, train_ds, val_ds, steps

    def _array(self, name, shape, blocks):
        return staged_array(self.folder, name, shape, blocks)

    def outputs(self):
        """The prefix's outputs for `feature_views` augmented views of the training images, stacked view after
        view, and for the validation images (unaugmented).

        They are written to .npy files (28x28x40 float32 per image and view for Lite0 at 224 px, frozen up to
        block 4a) and read back a batch at a time, so memory stays flat however many images there are; the
        operating system keeps them cached when RAM allows. On a CPU the prefix runs in LiteRT
        (`litert.fast_inference`).
        """
        if self._outputs is None:
            config, dataset = self.config, self.dataset
            rows, val_rows = dataset.splits["train"], dataset.splits["val"]
            shape = tuple(self.prefix.output.shape[1:])
            runner = None

            def run(rows, views, augment=None):
                nonlocal runner
                if runner is None:
                    print(f"Computing the frozen layers once: {config.feature_views} augmented views of "
                          f"{len(dataset.splits['train'])} training images and {len(val_rows)} validation images",
                          flush=True)
                    runner, _ = fast_inference(self.prefix, n_images=config.feature_views * len(rows) + len(val_rows))
                for view in range(views):
                    ds = make_dataset(dataset.images, rows, dataset.labels[rows], config.batch_size, augment=augment,
                                      seed=config.seed + view)
                    for x, _ in ds:
                        yield runner.predict_on_batch(x)

            self._outputs = (
                self._array("frozen-train", (config.feature_views * len(rows), *shape),
                            lambda: run(rows, config.feature_views, config.augment)),
                self._array("frozen-val", (len(val_rows), *shape), lambda: run(val_rows, 1)))
        return self._outputs

    def features(self):
        """Pooled features of the prefix outputs (1280 floats per image and view), also written to disk: at
        50k images two views would otherwise sit in memory while Keras' predict gathers them."""
        if self._features is None:
            def pool(arrays, name):
                def blocks():
                    ds = make_dataset(arrays, np.arange(len(arrays)), np.zeros((len(arrays), 1), np.float32),
                                      self.config.batch_size)
                    pooled = keras_predictor(self.pooled)
                    return (pooled.predict_on_batch(x) for x, _ in ds)

                return self._array(name, (len(arrays), *self.pooled.output.shape[1:]), blocks)

            views, val_x = self.outputs()
            self._features = (pool(views, "pooled-train"), pool(val_x, "pooled-val"))
        return self._features


def set_trainable(model, phase, frozen_layers):
    if phase.trains == "head":
        freeze_backbone(model)
    else:
        unfreeze_backbone(model, frozen_layers)


def train(model, dataset, config, run):
    """Train `model` in place through `run.phases`; it ends with the best phase's weights.

    `run` is a `TrainingRun`: the builder, phases, frozen point, folders, and where to start: a phase and
    epoch, or a killed run's saved state (`run.resume`). The final model is the last phase's unless an
    earlier phase scored strictly better on `config.monitor` (the seed's val_accuracy).
    """
    result = TrainResult()
    parts = (run.builder.split_at_frozen_prefix(model, run.frozen_layers, config.backbone)
             if config.feature_cache else None)
    inputs = (CachedInputs(run.builder, model, parts, dataset, config, run.staging_dir) if parts
              else ImageInputs(model, dataset, config))
    # a multi-label run weighs positives inside its loss (run.positive_weights): Keras' class_weight is per image
    weights = (None if dataset.multi_label else
               class_weights(dataset.targets[dataset.splits["train"]], len(dataset.class_names), config.class_weight))
    sign = 1 if monitor_mode(config.monitor) == "max" else -1
    state = run.resume
    start_phase, start_epoch = (state.phase, state.epoch) if state else (run.start_phase, run.initial_epoch)
    best_of, weights_of = {}, {}  # per phase: best monitored value (higher is better), weights at its end
    if state:
        print(f"Resuming phase {state.phase} after epoch {state.epoch}", flush=True)
        result.history, result.seconds = list(state.info["history"]), dict(state.info["seconds"])
        best_of = {int(k): v for k, v in state.info["best_of"].items()}
        weights_of = {p: state.list_of(f"phase{p}") for p in best_of}
    for phase in run.phases:
        if phase.number < start_phase:
            continue
        initial_epoch = start_epoch if phase.number == start_phase else 0
        resuming = state is not None and phase.number == state.phase
        key = f"phase{phase.number}_seconds"
        seconds_before, start = (result.seconds.get(key, 0.0) if resuming else 0.0), time.perf_counter()
        set_trainable(model, phase, run.frozen_layers)
        trainable, train_ds, val_ds, steps = inputs.for_phase(phase, initial_epoch)
        print(f"Phase {phase.number}: {phase.title}", flush=True)
        run.builder.compile(trainable, phase.learning_rate)
        control = PhaseControl(config, run.staging_dir / phase.checkpoint, model,
                               *((Progress(**state.info["progress"]), state.list_of("best")) if resuming else ()))
        control.set_model(trainable)
        saver = resume.Save(run.staging_dir, model, control,
                            {"fingerprint": run.fingerprint, "phase": phase.number, "history": result.history,
                             "seconds": result.seconds, "best_of": best_of},
                            weights_of, lambda before=seconds_before, began=start: before + time.perf_counter() - began)
        if resuming:
            with run.builder.scope():  # the optimizer's variables are built here: under the strategy, if any
                state.restore(model, trainable)
        if resuming and (control.progress.stopped or initial_epoch >= phase.epochs):
            control.on_train_end()  # the phase had ended: finish it as its last epoch did
        else:
            callbacks = [control, keras.callbacks.TensorBoard(log_dir=str(run.log_dir / f"phase{phase.number}")),
                         keras.callbacks.TerminateOnNaN(), saver]
            history = trainable.fit(
                train_ds, steps_per_epoch=steps, epochs=phase.epochs, initial_epoch=initial_epoch,
                validation_data=val_ds, class_weight=weights, callbacks=callbacks, shuffle=False,
                verbose=1 if sys.stdout.isatty() and not quiet() else 2)  # a bar per epoch on a terminal, else a line
            if not np.isfinite(history.history["loss"][-1]):
                raise UserError(f"training diverged in phase {phase.number}: the loss became NaN at learning rate "
                                f"{phase.learning_rate:g}; lower --lr (phase 1) or --finetune-lr (phase 2)")
            result.history += _epochs(history, phase.number, initial_epoch)
        result.seconds[key] = seconds_before + time.perf_counter() - start
        best_of[phase.number] = max(sign * e[config.monitor] for e in result.history if e["phase"] == phase.number)
        weights_of[phase.number] = model.get_weights()
    best = max(best_of, key=lambda n: (best_of[n], n))  # ties go to the later phase
    last = max(best_of)
    result.final_phase = best
    if best != last:
        print(f"Phase {last} did not beat phase {best} on validation; the final model keeps phase {best}'s weights")
        model.set_weights(weights_of[best])
    return result


@dataclass
class TrainingRun:
    """How `train` runs: the model builder, the phases, where fine-tuning starts and where files go."""

    builder: object  # networks.Builder: builds and compiles every model under one scope
    phases: list  # [Phase], in order
    frozen_layers: int
    staging_dir: Path  # checkpoints and cached frozen-layer outputs, published or deleted when the run ends
    log_dir: Path  # TensorBoard logs, one subfolder per phase
    start_phase: int = 1  # a run may start at any phase...
    initial_epoch: int = 0  # ...and any epoch of it
    resume: object = None  # or a killed run's resume.RunState, which says where to go on
    fingerprint: dict = None  # resume.fingerprint of this run's options and data, saved with its state
