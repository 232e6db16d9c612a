"""cxr: chest X-ray classifiers by transfer learning with Keras 3.

The package's layers, each importing only those before it (tests/test_layers.py checks it):
`data` (files -> images and labels), `model` (the networks, their outputs, the population check), `evaluate`
(numbers, tables and pictures), `bundle` (the saved model and how it is served), `training` (one run, top to
bottom), `commands` (what the CLI runs, starting from a saved model), then `cli`.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Where the flat modules of cxr <= 2026-12-06 live now: `from cxr.run import train` keeps working, with a warning
MOVED = {
    "backbones": "model.backbones", "lite0": "model.lite0", "models": "model.networks", "inference": "model.inference",
    "population": "model.population", "saved_model": "bundle.saved_model", "litert": "bundle.litert",
    "precision": "bundle.precision", "views_on_demand": "bundle.views_on_demand", "model_card": "bundle.model_card",
    "artifacts": "bundle.artifacts", "config": "training.config", "run": "training.run", "train": "training.loop",
    "resume": "training.resume", "distribute": "training.distribute", "predict": "commands.predict",
    "serve": "commands.serve", "listen": "commands.listen", "export": "commands.export",
    "calibrate": "commands.calibrate", "dicom_results": "commands.dicom_results",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `cxr.OLD` as the module it moved to (the same module object, not a copy)."""

    def find_spec(self, name, path=None, target=None):
        old = name.removeprefix(__name__ + ".")
        if name.startswith(__name__ + ".") and old in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.removeprefix(__name__ + '.')]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system writes the old name's spec over it; put it back
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.append(_Moved())
