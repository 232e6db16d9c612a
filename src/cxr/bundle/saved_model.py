"""A trained model as cxr saves it: the model file and `class_names.json` beside it, loaded and checked once.

`SavedModel` is what predict, evaluate, explain (and every later command) start from: the class names, image
size, backbone, operating point (and where it was fitted), the model file's hash and its population check
(`population.npz`, `cxr.model.population`), with one `predict(images)` that returns calibrated probabilities and
labels from LiteRT or Keras, and `raw_outputs(images)` that also returns the features the check reads. Loading
it imports neither TensorFlow nor Keras: `cxr predict` with a cached LiteRT conversion never needs them.
"""

import hashlib
import json
from pathlib import Path


from cxr.atomic import atomic_path, file_sha256, write_bytes, write_json
from cxr.bundle.serving import INT8_FILE, ServingPlan, int8_file
from cxr.data.vocabulary import Code
from cxr.errors import UserError
from cxr.model.inference import predict_outputs
from cxr.model.population import POPULATION_FILE, UNAVAILABLE, Population
from cxr.model.task import Task

CLASS_NAMES_FILE = "class_names.json"
# the version of class_names.json this cxr writes (metadata.schema.json); a file without one is version 1
METADATA_VERSION = 2
SCHEMA_FILE = "metadata.schema.json"
MODEL_FILE = "model.h5"
# class_names.json keys that describe the model; every other key belongs to the operating point
# ("distillation": the record of --distill, removed on 2026-12-07, in models saved before)
MODEL_KEYS = ("metadata_version", "class_names", "img_size", "backbone", "test_time_scales", "multi_label", "codes",
              "model_sha256", "inference", "population_file", "population_unavailable", "distillation")
TAPS = "taps"  # the LiteRT cache's name for the network with the population taps (networks.with_population_taps)


def metadata_schema():
    """The JSON Schema of class_names.json (metadata.schema.json, shipped with cxr)."""
    from importlib import resources

    return json.loads(resources.files("cxr.bundle").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def read_info(info_path):
    """class_names.json as a dict, checked against its JSON Schema (`metadata_schema`) and for what a schema
    can't say (names that must be class names, a finding without its point): UserError naming the file and the
    first fault. A file of an older version (the oldest: a list of class names) loads as it is."""
    fix = "use the class_names.json that training wrote beside this model, or train again"
    try:
        info = json.loads(Path(info_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{info_path}: not readable as JSON ({str(error).splitlines()[0][:80]}); {fix}") from None
    if isinstance(info, list):  # version 0: the class names alone
        info = {"class_names": info}
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: not a JSON object; {fix}")
    version = info.get("metadata_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > METADATA_VERSION:
        raise UserError(f"{info_path}: metadata version {version}, written by a newer cxr (this one reads up to "
                        f"{METADATA_VERSION}); upgrade cxr")
    import jsonschema

    schema = metadata_schema()
    fault = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(info))
    if fault is not None:
        key = fault.path[0] if fault.path else next(k for k in fault.validator_value if k not in info)
        raise UserError(f"{info_path}: {key} {schema['properties'][key]['description']}; {fix}")
    names = info["class_names"]
    if len(names) < 2 and not info.get("multi_label"):  # one finding is a model; one class isn't
        raise UserError(f"{info_path}: class_names {schema['properties']['class_names']['description']}; {fix}")
    strangers = [n for n in (*info.get("codes", {}), *info.get("findings", {})) if n not in names]
    positive = info.get("positive_class")
    if positive is not None and positive not in names:
        raise UserError(f"{info_path}: positive_class {positive!r} is not one of its class_names "
                        f"({', '.join(names)}); {fix}")
    if strangers:
        raise UserError(f"{info_path}: {strangers[0]!r} (in codes or findings) is not one of its class_names; {fix}")
    missing = [n for n in names if n not in info.get("findings", {})]
    if info.get("multi_label") and missing:
        raise UserError(f"{info_path}: \"findings\" needs a temperature and a threshold for {missing[0]!r}; {fix}")
    return info


class SavedModel:
    """A classifier and everything needed to use it.

    Attributes: `path` (the model file, None while the model exists only in memory), `class_names` (output
    order), `img_size`, `backbone`, `operating_point` ({"positive_class", "temperature", "threshold",
    "method", ...}: argmax at temperature 1 for models saved without one). A `multi_label` model has one
    sigmoid output per finding, and its operating point one temperature and threshold per finding:
    {"findings": {name: {"temperature", "threshold", "method", ...}}, "method", "target_sensitivity", ...}.
    `population`: its `population.Population` check, None for a model saved before cxr had one.
    """

    def __init__(self, info, path=None, keras_model=None):
        self.path = Path(path) if path is not None else None
        self.info = info
        self.class_names = list(info["class_names"])
        self.img_size = info.get("img_size")
        self.backbone = info.get("backbone")
        self.test_time_scales = info.get("test_time_scales", [1.0])  # the zoomed views the model averages
        self.task = Task.of(self.class_names, bool(info.get("multi_label", False)))  # what its outputs mean
        self.operating_point = self.task.default_point() | {k: v for k, v in info.items() if k not in MODEL_KEYS}
        self._keras_model = keras_model
        self._predictor, self.engine, self._tapped = None, None, None
        self._sha256 = None
        self.population = None
        self.population_note = UNAVAILABLE  # why there is no check, when there is none
        # how training chose to serve it ({"precision": "int8" | "float32", "reason", "guard", "views_on_demand",
        # ...}; None for models saved before cxr had int8), and the plan resolved from it and --precision
        self.inference = info.get("inference")
        self.plan = ServingPlan()  # float32, every view: as trained
        # the site's own codes for the DICOM results ({class: vocabulary.Code}, from --codes); others: the vocabulary's
        self.codes = {name: Code(c["code"], c["scheme"], c["meaning"]) for name, c in info.get("codes", {}).items()}
        self._int8 = None  # an int8 conversion still in memory (during training)
        self._conversions = {}  # {LiteRT cache tag: float32 flatbuffer} made before the model had a file

    @classmethod
    def load(cls, path, precision="auto"):
        """The model at `path` and the class_names.json beside it, to be run at `precision` ("auto": the one its
        training chose; "float32"; "int8"); UserError when either file is missing or unusable, or int8 is asked
        of a model without an int8 conversion."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such model file; train one first or pass --model PATH")
        info_path = path.parent / CLASS_NAMES_FILE
        if not info_path.is_file():
            raise UserError(f"{info_path}: not found; cxr needs the {CLASS_NAMES_FILE} that training wrote "
                            "beside the model")
        info = read_info(info_path)
        model = cls(info, path)
        recorded = model.info.get("model_sha256")
        if recorded is not None and recorded != model.sha256:
            raise UserError(f"{path}: this model file is not the one {info_path} describes (its hash differs); "
                            "use the model.h5 and class_names.json of one training run")
        if "population_unavailable" in info:  # fitted without a check, and why
            model.population_note = info["population_unavailable"]
        elif (path.parent / POPULATION_FILE).is_file():
            model.population = Population.load(path.parent / POPULATION_FILE, model.sha256)
        elif "population_file" in info or "inference" in info:  # saved with a check (every model since int8 was)
            model.population_note = (
                f"{path.parent / POPULATION_FILE} is missing: this model was saved with a population check, which is "
                f"off until that file is copied back beside {path.name} (its answers can't say whether an image is "
                "unlike its training images)")
        missing = next((p for p in model.int8_files().values() if not p.is_file()), None)
        on_disk = missing is None and "int8_sha256" in (model.inference or {})
        model.plan = ServingPlan.resolve(model.inference, precision, (missing or model.int8_path, on_disk), path)
        return model

    @classmethod
    def from_keras(cls, keras_model, class_names, img_size, backbone, test_time_scales=(1.0,), multi_label=False):
        """A model still in memory (during training), with no operating point yet."""
        return cls({"class_names": list(class_names), "img_size": img_size, "backbone": backbone,
                    "test_time_scales": list(test_time_scales), "multi_label": multi_label}, keras_model=keras_model)

    @property
    def sha256(self):
        """The model file's SHA-256 (hex), None while the model is only in memory."""
        if self._sha256 is None and self.path is not None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def multi_label(self):
        """Whether the model has one sigmoid per finding (its task is `Findings`) rather than one softmax."""
        return self.task.multi_label

    @property
    def positive_index(self):
        """The positive class's column (None for a multi-label model, where each finding is its own)."""
        return None if self.multi_label else self.class_names.index(self.operating_point["positive_class"])

    def require_data(self, labels_csv, command):
        """UserError unless the data given to `command` (evaluate, calibrate) suits this model: a labels CSV
        (`labels_csv` True) for a multi-label model, class folders otherwise."""
        if labels_csv and not self.multi_label:
            raise UserError(f"{self.path} classifies class folders: {command} it with --data-dir (--labels is for "
                            "multi-label models)")
        if not labels_csv and self.multi_label:
            raise UserError(f"{self.path} is a multi-label model: {command} it on a labels CSV with --labels CSV "
                            "--images DIR")

    def finding_points(self, key):
        """(findings,) values of `key` ("temperature", "threshold") of a multi-label model's operating point."""
        return [self.operating_point["findings"][f][key] for f in self.class_names]

    @property
    def keras_model(self):
        """The Keras model (loaded on first use; Grad-CAM and training need it, prediction may not)."""
        if self._keras_model is None:
            import keras

            try:
                self._keras_model = keras.models.load_model(self.path, compile=False)
            except Exception as error:
                raise UserError(f"{self.path}: could not load the model "
                                f"({str(error).splitlines()[0][:160]})") from None
            self._check_outputs(self._keras_model)
        return self._keras_model

    def predictor(self, n_images=None):
        """What computes the outputs and the population check's features (`networks.with_population_taps`): its
        LiteRT conversion where it pays, else the Keras model.

        A conversion cached for this model file is used without loading TensorFlow or Keras; otherwise
        `litert.fast_inference` decides (`n_images`: how many images it will see; None: convert if possible).
        It runs `self.plan`: int8 or float32, and where training chose to (`plan.margin`), the views beyond the
        first only for uncertain images.
        """
        if self._predictor is not None:
            return self._predictor
        if self.plan.precision == "int8":
            self._serve_int8(self._read_int8())
        elif self.plan.margin is not None:
            from cxr.bundle.views_on_demand import ViewsOnDemand

            first, others = self.view_predictors(n_images)
            self._serve_views(ViewsOnDemand(first, others, self.task, self.plan.margin), "float32")
        else:
            self._predictor, self.engine = self._converted(TAPS, self.tapped_model, n_images)
        features = self._predictor.output_shape[-1] - len(self.class_names)
        if features < 1 or self.population is not None and features != sum(self.population.dims):
            raise UserError(f"{self.path}: the model's outputs don't match {CLASS_NAMES_FILE} and "
                            f"{POPULATION_FILE}; use the files of one training run")
        return self._predictor

    def _converted(self, tag, keras_model, n_images):
        """(predictor, engine) of the network `keras_model()` builds from this model file, named `tag` in the
        LiteRT cache: its cached conversion, without loading Keras, or what `litert.fast_inference` decides."""
        from cxr.bundle import litert

        # the conversion of this file as a model of this many classes: a class_names.json naming another count is
        # checked against the Keras model's outputs (`_check_outputs`), never answered from the cache
        tag = f"{len(self.class_names)}-{tag}"
        cached = litert.cached_conversion(self.path, self.sha256, tag) if self.path is not None else None
        if cached is not None:
            return cached, "litert"
        predictor, engine = litert.fast_inference(keras_model(), self.path, n_images, digest=self.sha256, tag=tag)
        if self.path is None and isinstance(predictor, litert.LiteRTModel):
            self._conversions[tag] = predictor.flatbuffer  # cached with the model file when it is saved
        return predictor, engine

    def view_predictors(self, n_images=None):
        """(the first view's predictor: the image as it is, (n, S, S, 3) -> (n, classes + features) as
        `predictor`'s; [each other test-time view's predictor, (n, S, S, 3) -> (n, classes)]), for serving the
        views on demand (`cxr.bundle.views_on_demand`). Cached conversions are used without importing Keras."""
        from functools import partial

        first, others = self.view_scales()
        others = [self._converted(f"view{s:g}", partial(self.view_model, s), n_images)[0] for s in others]
        return self._converted(f"{TAPS}-view{first:g}", partial(self.view_model, first, True), n_images)[0], others

    def view_scales(self):
        """(the first view's scale: the one nearest the image as it is, [the other test-time views' scales])."""
        first = min(self.test_time_scales, key=lambda s: abs(s - 1))
        return first, [s for s in self.test_time_scales if s != first]

    def view_model(self, scale, taps=False):
        """The Keras model of one test-time view (`scale`), with the population check's taps if `taps`."""
        from cxr.model import backbones, networks

        if taps:
            return networks.with_population_taps(self.keras_model, backbones.population_taps(self.backbone), (scale,))
        return networks.with_test_time_scales(self.keras_model, (scale,))

    def _serve_views(self, predictor, precision):
        from cxr.bundle.litert import LiteRTModel

        engine = "litert" if all(isinstance(p, LiteRTModel) for p in (predictor.first, *predictor.others)) else "keras"
        self._predictor = predictor
        self.engine = f"{engine}{' int8' if precision == 'int8' else ''}, views on demand"

    def _serve_int8(self, flatbuffers):
        """Serve the int8 conversions `flatbuffers` ({"": the model with its taps, or its first view's; "view0.9":
        another view's, ...}) by the plan: every view, or the views on demand at its margin."""
        from cxr.bundle.views_on_demand import int8_predictor

        self._predictor = int8_predictor(flatbuffers, self.task, self.plan.margin)
        self.engine = "litert int8" + (", views on demand" if self.plan.margin is not None else "")

    def serve(self, record, int8=None, predictor=None):
        """Serve as training chose (`cxr.bundle.serving.choose`), from now on: `record` is the choice and what
        decided it (saved as the metadata's "inference"); `int8` the int8 flatbuffers ({"": the model with its
        taps, or its first view's; "view0.9": another view's}), where int8 is served (saved beside the model);
        `predictor` the `views_on_demand.ViewsOnDemand` already built, where the views are served on demand."""
        self.inference, self._int8 = record, int8
        self.plan = ServingPlan.resolve(record, "auto", (self.int8_path, int8 is not None), self.path)
        if predictor is not None:
            self._serve_views(predictor, self.plan.precision)
        elif int8 is not None:
            self._serve_int8(int8)

    @property
    def int8_path(self):
        return self.path.parent / INT8_FILE if self.path is not None else None

    def int8_files(self):
        """{tag: the int8 conversion's file}: INT8_FILE (the model with its taps, or its first view's) and, for a
        model saved with one int8 conversion per view, each other view's."""
        views = (self.inference or {}).get("int8_views", {})
        return {"": self.int8_path} | {tag: self.path.parent / int8_file(tag) for tag in views}

    def _read_int8(self):
        if self._int8 is not None:
            return self._int8
        recorded = {"": (self.inference or {}).get("int8_sha256")} | (self.inference or {}).get("int8_views", {})
        flatbuffers = {}
        for tag, path in self.int8_files().items():
            try:
                data = path.read_bytes()
            except OSError:
                raise UserError(f"{path}: not found; use the files of one training run") from None
            if recorded.get(tag) is not None and recorded[tag] != hashlib.sha256(data).hexdigest():
                raise UserError(f"{path}: not the int8 conversion {CLASS_NAMES_FILE} describes (its hash "
                                "differs); use the files of one training run")
            flatbuffers[tag] = data
        return flatbuffers

    def tapped_model(self):
        """The Keras model with the population check's taps: image -> [outputs | features]."""
        from cxr.model import backbones, networks

        if self._tapped is None:
            self._tapped = networks.with_population_taps(self.keras_model, backbones.population_taps(self.backbone),
                                                       self.test_time_scales)
        return self._tapped

    def population_layers(self):
        """(layer names, their feature counts) in the order of `raw_outputs`' features."""
        from cxr.model import backbones

        taps = backbones.population_taps(self.backbone)
        dims = [int(self.tapped_model().get_layer(f"tap_{t}").output.shape[-1]) for t in taps]
        return [*taps, "avg_pool"], [*dims, int(self.keras_model.get_layer("avg_pool").output.shape[-1])]

    def is_other_data(self, folder):
        """True when `folder` lies outside the folders of the data the operating point was fitted on (or those
        are unknown)."""
        source = self.operating_point.get("fitted_on")
        if not source:
            return True
        folder = Path(folder).resolve()
        return not any(folder == Path(root) or Path(root) in folder.parents
                       for root in source.get("same_data", [source["data_dir"]]))

    def raw_outputs(self, images, rows=None, batch_size=32, tta=False):
        """((n, classes) softmax (multi-label: sigmoid) outputs before calibration, (n, features) the population
        check's features) for `images[rows]` (uint8, N x H x W x 3)."""
        outputs = predict_outputs(self.predictor(), images, rows, batch_size, tta)
        return outputs[:, :len(self.class_names)], outputs[:, len(self.class_names):]

    def raw_probabilities(self, images, rows=None, batch_size=32, tta=False):
        """(n, classes) the model's outputs for `images[rows]`, before calibration."""
        return self.raw_outputs(images, rows, batch_size, tta)[0]

    def check_population(self, features):
        """The `population.PopulationCheck` of (n, features) features, or None when this model has no check."""
        return self.population.check(features) if self.population is not None else None

    def calibrate(self, raw):
        """(calibrated probabilities, labels) at the operating point, for (n, classes) raw outputs: labels are
        (n,) class indices, or for a multi-label model an (n, findings) 0/1 matrix of the findings called."""
        return self.task.calibrate(self.operating_point, raw)

    def predict(self, images, rows=None, batch_size=32, tta=False):
        """(calibrated probabilities (n, classes), labels (n,) or (n, findings)) for `images[rows]`."""
        return self.calibrate(self.raw_probabilities(images, rows, batch_size, tta))

    def save(self, models_dir):
        """Write model.h5, then class_names.json with the operating point and the model file's hash."""
        self.path = Path(models_dir) / MODEL_FILE
        with atomic_path(self.path) as tmp:
            # without the compile settings, a multi-label model's masked loss need not be known to load the file
            from absl import logging as absl_logging

            # Keras warns that .h5 is legacy: cxr's own choice (the seed's format, which every Keras loads), not
            # the user's to act on
            verbosity = absl_logging.get_verbosity()
            absl_logging.set_verbosity(absl_logging.ERROR)
            try:
                self.keras_model.save(tmp, include_optimizer=not self.multi_label)
            finally:
                absl_logging.set_verbosity(verbosity)
        self._sha256 = None
        if self.population is not None:
            self.population.save(Path(models_dir) / POPULATION_FILE, self.sha256)
        else:  # an earlier run's check would not be this model's
            (Path(models_dir) / POPULATION_FILE).unlink(missing_ok=True)
        for stale in Path(models_dir).glob(int8_file("*")):  # an earlier run's conversions would not be this model's
            stale.unlink()
        self.int8_path.unlink(missing_ok=True)
        if self._int8 is not None:
            digests = {tag: hashlib.sha256(data).hexdigest() for tag, data in self._int8.items()}
            for tag, data in self._int8.items():
                write_bytes(self.int8_path if not tag else Path(models_dir) / int8_file(tag), data)
            views = {tag: digest for tag, digest in digests.items() if tag}
            self.inference = self.inference | {"int8_sha256": digests[""]} | ({"int8_views": views} if views else {})
        self.info = {"metadata_version": METADATA_VERSION, "class_names": self.class_names, "img_size": self.img_size,
                     "backbone": self.backbone, "test_time_scales": self.test_time_scales,
                     **({"multi_label": True} if self.multi_label else {}),
                     **({"codes": {name: {"code": c.value, "scheme": c.scheme, "meaning": c.meaning}
                                   for name, c in self.codes.items()}} if self.codes else {}),
                     **self.operating_point, "model_sha256": self.sha256,
                     **({"inference": self.inference} if self.inference is not None else {}),
                     **({"population_file": POPULATION_FILE} if self.population is not None else
                        {"population_unavailable": self.population_note})}
        write_json(Path(models_dir) / CLASS_NAMES_FILE, self.info)
        from cxr.bundle import litert

        # the conversions training made, cached for this file: the first `cxr predict` is as quick as the next
        for tag, flatbuffer in self._conversions.items():
            litert.write_cache(litert.cache_path(self.path, self.sha256, tag), flatbuffer)
        return self.path

    def copy_to(self, models_dir, operating_point):
        """A copy of this model file in `models_dir` with `operating_point` beside it; this one is untouched."""
        from cxr.atomic import copy_file

        copy = Path(models_dir) / MODEL_FILE
        copy_file(self.path, copy)
        if self.population is not None:
            copy_file(self.path.parent / POPULATION_FILE, Path(models_dir) / POPULATION_FILE)
        for path in self.int8_files().values():
            if path.is_file():
                copy_file(path, Path(models_dir) / path.name)
        info = ({k: v for k, v in self.info.items() if k in MODEL_KEYS} | operating_point
                | {"metadata_version": METADATA_VERSION, "model_sha256": self.sha256})
        write_json(Path(models_dir) / CLASS_NAMES_FILE, info)
        copied = SavedModel(info, copy, keras_model=self._keras_model)
        copied.population = self.population
        return copied

    def _check_outputs(self, model):
        outputs = model.output_shape[-1]
        if outputs != len(self.class_names):
            raise UserError(f"{self.path}: the model has {outputs} outputs but {CLASS_NAMES_FILE} names "
                            f"{len(self.class_names)} classes; use the model.h5 and {CLASS_NAMES_FILE} of one "
                            "training run")
