"""cxr: chest X-ray classifiers by transfer learning with Keras 3.

The package's layers, each importing only those before it (tests/test_layers.py checks it):
`data` (files -> images and labels), `model` (the networks, their outputs, the population check), `evaluate`
(numbers, tables and pictures), `bundle` (the saved model and how it is served), `monitor` (the prediction log
and what `cxr monitor` measures in it), `training` (one run, top to bottom), `commands` (what the CLI runs,
starting from a saved model), then `cli`.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Where the flat modules of cxr <= 2026-12-06 live now: `from cxr.run import train` keeps working, with a warning
MOVED = {
    "backbones": ("model.backbones",), "lite0": ("model.lite0",), "models": ("model.networks",),
    "inference": ("model.inference",), "population": ("model.population",),
    "saved_model": ("bundle.saved_model", "model.inference"), "litert": ("bundle.litert",),
    "precision": ("bundle.precision", "bundle.fidelity", "bundle.serving"), "views_on_demand": ("bundle.views_on_demand",),
    "model_card": ("bundle.model_card",), "artifacts": ("bundle.artifacts",), "config": ("training.config",),
    "run": ("training.run", "commands.evaluate"), "train": ("training.loop",), "resume": ("training.resume",),
    "distribute": ("training.distribute",), "predict": ("commands.predict",), "serve": ("commands.serve",),
    "listen": ("commands.listen",), "export": ("commands.export",), "calibrate": ("commands.calibrate",),
    "dicom_results": ("commands.dicom_results",),
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `cxr.OLD` as a module whose names are those of the modules it was split into."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith(__name__ + ".") and name.removeprefix(__name__ + ".") in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        homes = [f"{__name__}.{home}" for home in MOVED[module.__name__.removeprefix(__name__ + ".")]]
        warnings.warn(f"{module.__name__} moved to {homes[0]}; import it from there", DeprecationWarning,
                      stacklevel=2)

        def __getattr__(attribute):
            for home in homes:
                found = getattr(importlib.import_module(home), attribute, _Moved)
                if found is not _Moved:
                    return found
            raise AttributeError(f"module {module.__name__!r} (now {homes[0]}) has no attribute {attribute!r}")

        module.__getattr__ = __getattr__


sys.meta_path.append(_Moved())
