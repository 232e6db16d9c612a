"""What a model answered on its validation split, saved beside it at training (`reference.npz`), so that
`cxr monitor` compares production with what the model was tested on: the calibrated probabilities, the calls,
the labels, the population check's scores and the mix of input properties (format, resolution, and from DICOM
headers modality, view, device, sex and age band). Like population.npz it records the model file's SHA-256, and
a reference of another model is refused."""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.atomic import atomic_path
from cxr.errors import UserError
from cxr.model.task import Task

REFERENCE_FILE = "reference.npz"


@dataclass
class Reference:
    class_names: list
    multi_label: bool
    probabilities: np.ndarray  # (n, classes) calibrated, as served
    calls: np.ndarray  # (n, classes) 0/1: the classes (one per image) or findings called
    labels: np.ndarray  # (n,) class indices, or (n, findings) 1/0/nan
    population_scores: np.ndarray  # (n,), empty without a population check
    flag_rate: float  # the share of images like the validation ones the population check flags (0: no check)
    model_sha256: str
    inputs: dict = field(default_factory=dict)  # {property: {category: validation images}}; {} in older references

    @property
    def task(self):
        return Task.of(self.class_names, self.multi_label)

    @classmethod
    def of_validation(cls, model, images, rows, labels, paths=()):
        """The reference of `model` (a `SavedModel` with its operating point) on `images[rows]` with `labels`
        (`paths`: their files, for the input mix)."""
        return cls.of_outputs(model, *model.raw_outputs(images, rows), labels, paths)

    @classmethod
    def of_outputs(cls, model, raw, features, labels, paths=()):
        """The reference of `model` from its (n, classes) `raw` outputs and (n, features) `features` of images
        with `labels` (training has them already: its validation split's), read from `paths`."""

        probabilities, label = model.calibrate(raw)
        calls = model.task.labels_matrix(label).astype(np.int8)
        check = model.check_population(features)
        return cls(list(model.class_names), model.multi_label, probabilities.astype(np.float32), calls,
                   np.asarray(labels), np.zeros(0, np.float32) if check is None else check.scores.astype(np.float32),
                   0.0 if model.population is None else float(model.population.false_flag_rate), model.sha256,
                   input_counts(paths))

    def save(self, models_dir):
        with atomic_path(Path(models_dir) / REFERENCE_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, class_names=np.array(self.class_names), multi_label=self.multi_label,
                         probabilities=self.probabilities, calls=self.calls, labels=self.labels,
                         population_scores=self.population_scores, flag_rate=self.flag_rate,
                         model_sha256=np.array(self.model_sha256), inputs=np.array(json.dumps(self.inputs)))

    @classmethod
    def load(cls, model_path, model_sha256):
        """The reference beside the model file at `model_path`; UserError when it is missing, unreadable or of
        another model file."""
        path = Path(model_path).parent / REFERENCE_FILE
        if not path.is_file():
            raise UserError(f"{path}: not found; models trained before cxr had monitoring have no reference: train "
                            "the model again, or give cxr monitor --reference-data DIR (labelled images like the "
                            "validation split) to build one")
        try:
            with np.load(path, allow_pickle=False) as f:
                reference = cls([str(c) for c in f["class_names"]], bool(f["multi_label"]), f["probabilities"],
                                f["calls"], f["labels"], f["population_scores"], float(f["flag_rate"]),
                                str(f["model_sha256"]), json.loads(str(f["inputs"])) if "inputs" in f else {})
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"{path}: not a readable reference ({str(error).splitlines()[0][:80]}); train again") from None
        if reference.model_sha256 != model_sha256:
            raise UserError(f"{path}: the reference of another model file (its recorded hash differs); use the "
                            "files of one training run")
        return reference


def input_counts(paths):
    """{property: {category: images}} of the image files `paths` ({} for none), read from their headers."""
    from cxr.monitor.log import INPUT_PROPERTIES, file_properties, input_mix

    mixes = [input_mix(file_properties(p)) for p in paths]
    return {name: dict(Counter(m[name] for m in mixes)) for name in INPUT_PROPERTIES} if mixes else {}
