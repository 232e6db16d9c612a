"""`cxr export`: a saved model in the formats deployment runtimes load, each described by model-card.json.

- savedmodel: a TensorFlow SavedModel (TF Serving, Vertex AI). Signature `serving_default`: `image`, float32
  (N, S, S, 3), RGB, raw 0-255 values -> `probabilities`, (N, classes), calibrated as cxr gives them.
- tflite: the LiteRT flatbuffer that cxr itself runs on CPU (same input and output).
- tflite-int8: the same, int8 inside but for the first layers and the head (float32 in and out;
  `litert.to_int8_flatbuffer`), calibrated on 200 training images (the run's reports/splits.csv, or
  `--calibration-images`). Whether int8 kept the model's accuracy is what training's guard measured
  (`precision`): the model card carries its record.
- onnx: tf2onnx's conversion of that SavedModel at opset `ONNX_OPSET` (onnxruntime, Triton, C#/Java apps).

Preprocessing (ImageNet normalisation) is inside every export, and calibration (the operating point's
temperatures, `calibrated_model`) inside every float32 one, so their probabilities are `cxr predict --precision
float32`'s (int8's conversion corrects the head's bias from its logits, so tflite-int8 gives the probabilities
before calibration); resizing, the threshold and the population check are not: model-card.json gives them or says
that they stay in cxr, with the rest of what a deployment needs to know.
"""

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from cxr.atomic import atomic_path, file_sha256, write_bytes, write_json
from cxr.errors import UserError
from cxr.progress import progress
from cxr.bundle.model_card import describe, package_version
from cxr.bundle.saved_model import SavedModel

FORMATS = {"savedmodel": "saved_model", "tflite": "model.tflite", "tflite-int8": "model.int8.tflite",
           "onnx": "model.onnx"}
CARD_FILE = "model-card.json"
GIVES = {"savedmodel": "TensorFlow SavedModel (TF Serving, Vertex AI)",
         "tflite": "LiteRT (TensorFlow Lite) flatbuffer, float32",
         "tflite-int8": "LiteRT (TensorFlow Lite) flatbuffer, int8 inside, float32 in and out",
         "onnx": "ONNX model (onnxruntime, Triton)"}
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


def export(model_path, formats, output_dir, calibration_images=None):
    """Write each of `formats` (keys of FORMATS) for the model at `model_path` into `output_dir`, then its
    model-card.json; returns {written path: what it gives}. Each file or folder appears complete or not at all.
    `calibration_images`: a folder of X-rays to calibrate tflite-int8 on (default: the run's training split)."""
    model = SavedModel.load(model_path)
    output_dir = Path(output_dir)
    calibration = _calibration_images(model, calibration_images) if "tflite-int8" in formats else None
    card = _card_to_extend(output_dir, model)
    output_dir.mkdir(parents=True, exist_ok=True)
    for leftover in [*output_dir.glob(".export-*"), *output_dir.glob(f".{FORMATS['savedmodel']}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # the work folders of an export that was killed
    try:
        written = _export(model, formats, output_dir, card, calibration)
    except OSError:
        raise  # the CLI names the file and says what to do
    except Exception as error:
        import tensorflow as tf

        if not isinstance(error, tf.errors.OpError):
            raise
        # TensorFlow reports a full disk or a refused write in its own error type, the file's name inside it
        reason = error.message.split(";")[-1].strip().splitlines()[0][:120] or type(error).__name__
        hint = "free some space" if "space" in reason.lower() else "check that folder's permissions"
        raise UserError(f"{output_dir}: could not write the export ({reason}); {hint} and run again (nothing of this "
                        "export was left behind)") from None
    write_json(output_dir / CARD_FILE, card)
    point = card["operating_point"]
    rule = (f"; the threshold ({point['threshold']:.4f} for {point['positive_class']}) and "
            if point.get("threshold") is not None else "; ")
    gives = {path: f"{GIVES[fmt]}: image (N, {model.img_size}, {model.img_size}, 3) RGB 0-255 -> "
                   f"{'uncalibrated' if fmt == 'tflite-int8' else 'calibrated'} probabilities of "
                   f"{', '.join(model.class_names)}" for fmt, path in written.items()}
    return gives | {output_dir / CARD_FILE: f"the model card: the decision rule{rule}every number a deployment needs; "
                                            "the population check is not in the exported files (it runs in cxr)"}


def _export(model, formats, output_dir, card, calibration=None):
    """`export`'s writing: each format into a work folder inside `output_dir`, then into place; returns {format:
    written path} and fills `card["exports"]`."""
    written = {}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as work:
        saved_model_dir = Path(work) / FORMATS["savedmodel"]
        classifier = calibrated_model(model)
        if {"savedmodel", "onnx"} & set(formats):
            _write_saved_model(classifier, model.img_size, saved_model_dir)
        bar = progress(dict.fromkeys(formats), desc="Exporting", unit="format")  # a conversion takes a minute
        for fmt in bar:  # in order, once each
            bar.set_description_str(f"Exporting {fmt}", refresh=False)
            target = output_dir / FORMATS[fmt]
            names = {"input_name": INPUT_NAME, "output_name": OUTPUT_NAME}
            if fmt == "savedmodel":
                _replace_folder(saved_model_dir, target)
                saved_model_dir = target
                details = {"runtime": "TensorFlow / TF Serving", "signature": "serving_default"}
            elif fmt == "tflite":
                from cxr.bundle import litert

                flatbuffer = litert.to_flatbuffer(classifier)
                write_bytes(target, flatbuffer)
                names = dict(zip(("input_name", "output_name"), litert.tensor_names(flatbuffer)))
                details = {"runtime": "LiteRT (TensorFlow Lite)", "sha256": file_sha256(target)}
            elif fmt == "tflite-int8":
                from cxr.bundle import litert

                # int8's conversion corrects the head's bias from its logits, which a temperature after the head
                # would scale: this file gives the probabilities before calibration (the card says so)
                flatbuffer = litert.to_int8_flatbuffer(model.keras_model, calibration)
                write_bytes(target, flatbuffer)
                names = dict(zip(("input_name", "output_name"), litert.tensor_names(flatbuffer)))
                details = {"runtime": "LiteRT (TensorFlow Lite)", "precision": "int8 (float32 input and output)",
                           "calibration": "not inside: apply the temperature of outputs.calibration to its "
                                          "probabilities",
                           "calibration_images": len(calibration), "sha256": file_sha256(target),
                           "accuracy_guard": (model.inference or {}).get("guard")}
            else:
                _write_onnx(saved_model_dir, target)
                details = {"runtime": "ONNX Runtime", "opset": ONNX_OPSET, "sha256": file_sha256(target),
                           "converter": f"tf2onnx {package_version('tf2onnx')}"}
            card["exports"][fmt] = {"path": FORMATS[fmt], **names, **details}
            written[fmt] = target
    return written


def _calibration_images(model, folder):
    """(n, S, S, 3) uint8 X-rays to calibrate int8 on: up to 200 of `folder`'s images, or of the training split
    in the run's reports/splits.csv beside the model's folder (seeded)."""
    import numpy as np

    from cxr.data.decode import is_image_file, try_decode
    from cxr.data.split import read_splits_csv, walk_files
    from cxr.bundle.precision import calibration_rows

    if folder is not None:
        paths = [p for p in walk_files(Path(folder)) if is_image_file(p)] if Path(folder).is_dir() else []
        if not paths:
            raise UserError(f"--calibration-images {folder}: no images there; give a folder of X-rays like the "
                            "training images")
    else:
        splits = model.path.parent.parent / "reports" / "splits.csv"
        if not splits.is_file():
            raise UserError(f"tflite-int8 needs X-rays to calibrate on and {splits} is not there; give "
                            "--calibration-images DIR (a folder of X-rays like the training images)")
        paths = read_splits_csv(splits, model.class_names, "train").paths
    decoded = [try_decode(paths[k], model.img_size)[0] for k in calibration_rows(np.arange(len(paths)), seed=0)]
    images = [image for image in decoded if image is not None]
    if not images:
        raise UserError(f"none of the calibration images could be read ({paths[0]} ...); give --calibration-images DIR")
    return np.stack(images)


def _card_to_extend(output_dir, model):
    """The model card to write: the existing one when `output_dir` already holds exports of this model."""
    import json

    card = describe(model) | {"exports": {}}
    card["population_check"].pop("file", None)  # population.npz stays beside model.h5: not part of the export
    card["outputs"]["calibration"] = ("inside the savedmodel, tflite and onnx files: their probabilities are "
                                      "calibrated, as cxr predict --precision float32 gives them; tflite-int8 gives "
                                      "them before calibration (" + card["outputs"]["calibration"] + ")")
    existing = output_dir / CARD_FILE
    if existing.is_file():
        try:
            previous = json.loads(existing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        if previous.get("model_sha256") != model.sha256:
            raise UserError(f"{output_dir}: holds the export of another model ({CARD_FILE}); pick an empty folder")
        card["exports"] = {fmt: entry for fmt, entry in previous.get("exports", {}).items()
                           if fmt in FORMATS and (output_dir / entry.get("path", "")).exists()}
    return card


def calibrated_model(model):
    """The Keras model of `model` (a `SavedModel`) with its operating point's calibration after it, computed as
    `cxr.model.inference` computes it: softmax(log p / T), or per finding sigmoid(logit(p) / T_k)."""
    import keras
    import numpy as np
    from keras import ops

    classifier = model.keras_model
    if model.multi_label:
        temperatures = np.asarray(model.finding_points("temperature"), dtype=np.float32)

        def calibrate(p):
            p = ops.clip(p, 1e-7, 1 - 1e-7)  # float32's margin from 0 and 1; cxr's float64 clips at 1e-12
            return ops.sigmoid((ops.log(p) - ops.log1p(-p)) / temperatures)
    else:
        temperature = float(model.operating_point["temperature"])

        def calibrate(p):
            return ops.softmax(ops.log(ops.clip(p, 1e-12, 1.0)) / temperature, axis=-1)

    image = keras.Input(classifier.input_shape[1:], name=INPUT_NAME)
    return keras.Model(image, keras.layers.Lambda(calibrate, name="calibration")(classifier(image)),
                       name="calibrated")


def _write_saved_model(classifier, img_size, path):
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.add_endpoint(
        "serving_default", lambda image: {OUTPUT_NAME: classifier(image, training=False)},
        input_signature=[tf.TensorSpec([None, img_size, img_size, 3], tf.float32, name=INPUT_NAME)])
    with contextlib.redirect_stdout(io.StringIO()):  # write_out lists every captured variable
        archive.write_out(str(path))


def _write_onnx(saved_model_dir, target):
    """tf2onnx on the SavedModel: its loader freezes the graph (converting the Keras model directly leaves the
    normalisation constants as extra graph inputs)."""
    import tensorflow as tf
    import tf2onnx
    from tf2onnx import tf_loader

    tf.get_logger().setLevel("ERROR")  # TF1 deprecation notices from inside tf2onnx
    tf2onnx.logging.set_level(logging.ERROR)

    graph_def, inputs, outputs, tensors_to_rename = tf_loader.from_saved_model(
        str(saved_model_dir), None, None, signatures=["serving_default"], return_tensors_to_rename=True)
    with atomic_path(target) as tmp:
        tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, opset=ONNX_OPSET,
                                       tensors_to_rename=tensors_to_rename, output_path=tmp)


def _replace_folder(source, target):
    """Move the folder `source` to `target`, replacing what was there in one rename."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)
