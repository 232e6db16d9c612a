"""Resume after interruption: everything a killed run needs to go on from its last completed epoch.

Keras' BackupAndRestore keeps weights, optimizer and the epoch, but not the phase, the early-stopping and
learning-rate-schedule state, the history or the cached frozen-layer outputs; so cxr keeps its own state in
models/.staging/resume/, written after every epoch (arrays first, then the small JSON that names them, each
renamed into place, so a kill leaves the previous complete state):

- state.json: the run's fingerprint (options and data), the phase and epochs completed in it, whether early
  stopping had stopped it, the history, the seconds spent, the best value of earlier phases, and the
  callbacks' counters (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint);
- the arrays: the model's variables (weights, BatchNormalization statistics, dropout seed state), the
  optimizer's (moments, step, learning rate), EarlyStopping's best weights, earlier phases' best weights.

The cached frozen-layer outputs stay in models/.staging/ beside it and are reused.
"""

import json
import os
from pathlib import Path

import keras
import numpy as np

from cxr.atomic import atomic_path, write_json
from cxr.errors import UserError

# Options that may differ between the killed run and its resumption (they don't change what is trained)
FREE_OPTIONS = ("port", "resume")


def fingerprint(config, data_key):
    """What must match for a run to continue another: every option but FREE_OPTIONS, and the data."""
    options = {k: v for k, v in config.to_dict().items() if k not in FREE_OPTIONS}
    return {"options": options, "data": data_key}


class RunState:
    """The saved state of an unfinished run (see the module docstring)."""

    def __init__(self, folder):
        self.folder = Path(folder) / "resume"
        self.info = {}
        self.arrays = {}

    @classmethod
    def load(cls, staging, expected):
        """The state of the run that was killed in `staging`, checked against `expected` (a `fingerprint`).

        UserError when there is none, or when it was a run with other options or data.
        """
        state = cls(staging)
        try:
            state.info = json.loads((state.folder / "state.json").read_text())
            with np.load(state.folder / state.info["arrays"]) as arrays:
                state.arrays = {k: arrays[k] for k in arrays.files}
        except (OSError, ValueError, KeyError):
            raise UserError(f"{Path(staging).parent.parent}: no unfinished run to resume there; run without "
                            "--resume to start one") from None
        saved = state.info["fingerprint"]
        if saved["data"] != expected["data"]:
            raise UserError(f"{Path(staging).parent.parent}: the unfinished run there used other images (files were "
                            "added, removed or changed); run without --resume to start over")
        changed = sorted(k for k in set(saved["options"]) | set(expected["options"])
                         if saved["options"].get(k) != expected["options"].get(k))
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')} {saved['options'].get(k)!r} then, {expected['options'].get(k)!r} now"
                             for k in changed)
            raise UserError(f"{Path(staging).parent.parent}: the unfinished run there had other options ({what}); give "
                            "the same options with --resume, or run without --resume to start over")
        return state

    @property
    def phase(self):
        return self.info["phase"]

    @property
    def epoch(self):
        return self.info["epoch"]

    def list_of(self, prefix):
        """The arrays saved under `prefix`-0, `prefix`-1, ... as a list (a Keras get_weights() layout)."""
        n = sum(1 for k in self.arrays if k.startswith(prefix + "-"))
        return [self.arrays[f"{prefix}-{i}"] for i in range(n)]

    def restore(self, model, trainable, callbacks):
        """Put the saved variables into `model` and `trainable`'s optimizer, and the counters into `callbacks`
        (after their on_train_begin, which resets them: see `Restore`)."""
        for variable, value in zip(model.variables, self.list_of("model")):
            variable.assign(value)
        optimizer = trainable.optimizer
        optimizer.build(trainable.trainable_variables)
        for variable, value in zip(optimizer.variables, self.list_of("optimizer")):
            variable.assign(value)
        return Restore(self, callbacks)


class Restore(keras.callbacks.Callback):
    """Last in the callback list: after EarlyStopping and ReduceLROnPlateau reset themselves at the start of
    fit, set them back to where the killed run left them."""

    def __init__(self, state, callbacks):
        super().__init__()
        self.state, self.callbacks = state, callbacks

    def on_train_begin(self, logs=None):
        saved = self.state.info["callbacks"]
        for callback in self.callbacks:
            if isinstance(callback, keras.callbacks.EarlyStopping):
                callback.wait, callback.best, callback.best_epoch = (saved["early"]["wait"], saved["early"]["best"],
                                                                     saved["early"]["best_epoch"])
                best = self.state.list_of("early-best")
                callback.best_weights = best or None
            elif isinstance(callback, keras.callbacks.ReduceLROnPlateau):
                callback.wait, callback.best, callback.cooldown_counter = (
                    saved["plateau"]["wait"], saved["plateau"]["best"], saved["plateau"]["cooldown_counter"])
            elif isinstance(callback, keras.callbacks.ModelCheckpoint):
                callback.best = saved["checkpoint"]["best"]


class Save(keras.callbacks.Callback):
    """Last but one in the callback list: after every epoch, the run's state (see the module docstring)."""

    def __init__(self, folder, image_model, callbacks, run_info, earlier_weights, seconds_so_far):
        super().__init__()
        self.folder = Path(folder) / "resume"
        self.image_model, self.callbacks = image_model, callbacks
        self.run_info = run_info  # fingerprint, phase, history and seconds before this fit, earlier phases' scores
        self.earlier_weights = earlier_weights  # {phase number: its best weights}
        self.seconds_so_far = seconds_so_far  # () -> seconds this phase has taken, across resumptions
        self.history = list(run_info["history"])

    def on_epoch_end(self, epoch, logs=None):
        arrays = {f"model-{i}": np.asarray(v) for i, v in enumerate(self.image_model.variables)}
        arrays |= {f"optimizer-{i}": np.asarray(v) for i, v in enumerate(self.model.optimizer.variables)}
        counters = {}
        for callback in self.callbacks:
            if isinstance(callback, keras.callbacks.EarlyStopping):
                counters["early"] = {"wait": callback.wait, "best": _number(callback.best),
                                     "best_epoch": callback.best_epoch}
                arrays |= {f"early-best-{i}": w for i, w in enumerate(callback.best_weights or [])}
            elif isinstance(callback, keras.callbacks.ReduceLROnPlateau):
                counters["plateau"] = {"wait": callback.wait, "best": _number(callback.best),
                                       "cooldown_counter": callback.cooldown_counter}
            elif isinstance(callback, keras.callbacks.ModelCheckpoint):
                counters["checkpoint"] = {"best": _number(callback.best)}
        for phase, weights in self.earlier_weights.items():
            arrays |= {f"phase{phase}-{i}": w for i, w in enumerate(weights)}
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self.run_info['phase']}-{epoch + 1}.npz"
        with atomic_path(self.folder / name) as tmp:
            np.savez(tmp, **arrays)
        info = self.run_info
        self.history.append({"phase": info["phase"], "epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        write_json(self.folder / "state.json", info | {
            "epoch": epoch + 1, "stopped": bool(self.model.stop_training), "callbacks": counters, "arrays": name,
            "history": self.history,
            "seconds": info["seconds"] | {f"phase{info['phase']}_seconds": self.seconds_so_far()}})
        for old in self.folder.glob("epoch-*.npz"):
            if old.name != name:
                old.unlink()


def _number(value):
    """A callback's best value for JSON (numpy and infinities included)."""
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else (1e308 if value > 0 else -1e308)


def remove(staging):
    """Forget the saved state (the run finished, or a new one starts)."""
    folder = Path(staging) / "resume"
    for path in folder.glob("*") if folder.is_dir() else ():
        path.unlink()
    if folder.is_dir():
        os.rmdir(folder)
