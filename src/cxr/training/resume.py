"""Resume after interruption: everything a killed run needs to go on from its last completed epoch.

Keras' BackupAndRestore keeps weights, optimizer and the epoch, but not the phase, the early-stopping and
learning-rate decisions, the history or the cached frozen-layer outputs; so cxr keeps one checkpoint of its own in
models/.staging/resume/, written after every epoch (arrays first, then the small JSON that names them, each
renamed into place, so a kill leaves the previous complete state):

- state.json: the run's fingerprint (options and data), the phase and epochs completed in it, the phase's
  decisions so far (`loop.Progress`, as a dict: early stopping, the best checkpoint, the learning rate's
  plateau), the history, the seconds spent and the best value of earlier phases;
- the arrays: the model's variables (weights, BatchNormalization statistics, dropout seed state), the
  optimizer's (moments, step, learning rate), the phase's best weights so far, earlier phases' best weights.

The cached frozen-layer outputs stay in models/.staging/ beside it and are reused.
"""

import json
import os
from dataclasses import asdict
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
        if "progress" not in state.info:
            raise UserError(f"{Path(staging).parent.parent}: the unfinished run there was saved by an earlier version "
                            "of cxr; run without --resume to start over")
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

    def restore(self, model, trainable):
        """Put the saved variables into `model` and `trainable`'s optimizer."""
        for variable, value in zip(model.variables, self.list_of("model")):
            variable.assign(value)
        optimizer = trainable.optimizer
        optimizer.build(trainable.trainable_variables)
        for variable, value in zip(optimizer.variables, self.list_of("optimizer")):
            variable.assign(value)


class Save(keras.callbacks.Callback):
    """Last in the callback list: after every epoch, the run's state (see the module docstring). `control`: the
    phase's `loop.PhaseControl`, whose `progress` and `best_weights` are saved with it."""

    def __init__(self, folder, image_model, control, run_info, earlier_weights, seconds_so_far):
        super().__init__()
        self.folder = Path(folder) / "resume"
        self.image_model, self.control = image_model, control
        self.run_info = run_info  # fingerprint, phase, history and seconds before this fit, earlier phases' scores
        self.earlier_weights = earlier_weights  # {phase number: its best weights}
        self.seconds_so_far = seconds_so_far  # () -> seconds this phase has taken, across resumptions
        self.history = list(run_info["history"])

    def on_epoch_end(self, epoch, logs=None):
        arrays = {f"model-{i}": np.asarray(v) for i, v in enumerate(self.image_model.variables)}
        arrays |= {f"optimizer-{i}": np.asarray(v) for i, v in enumerate(self.model.optimizer.variables)}
        arrays |= {f"best-{i}": w for i, w in enumerate(self.control.best_weights or [])}
        for phase, weights in self.earlier_weights.items():
            arrays |= {f"phase{phase}-{i}": w for i, w in enumerate(weights)}
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self.run_info['phase']}-{epoch + 1}.npz"
        with atomic_path(self.folder / name) as tmp:
            np.savez(tmp, **arrays)
        info = self.run_info
        self.history.append({"phase": info["phase"], "epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        write_json(self.folder / "state.json", info | {
            "epoch": epoch + 1, "progress": asdict(self.control.progress), "arrays": name, "history": self.history,
            "seconds": info["seconds"] | {f"phase{info['phase']}_seconds": self.seconds_so_far()}})
        for old in self.folder.glob("epoch-*.npz"):
            if old.name != name:
                old.unlink()


def remove(staging):
    """Forget the saved state (the run finished, or a new one starts)."""
    folder = Path(staging) / "resume"
    for path in folder.glob("*") if folder.is_dir() else ():
        path.unlink()
    if folder.is_dir():
        os.rmdir(folder)
