"""Run a Keras model's forward pass through LiteRT (TensorFlow Lite) on CPU.

LiteRT's XNNPACK kernels run EfficientNet-Lite0 several times faster than Keras on this project's 2-core
CPUs and agree with it to float32 rounding (benchmarks/README.md), so inference-only work on a machine
without a GPU goes through here: the frozen-layer pass of training, the validation and test
probabilities of `cxr train` and `cxr evaluate`, and `cxr predict`. Training, Grad-CAM and anything else that
needs gradients stays in Keras.
"""

import contextlib
import io
import os
from pathlib import Path

import numpy as np

from cxr.atomic import file_sha256, write_bytes
from cxr.errors import warn

BATCH_SIZE = 8  # XNNPACK's speed is flat from 1 to 32 images per call on 2 cores; 8 keeps padding waste small
CACHED_MODELS = 8
# A conversion costs a fixed time that LiteRT wins back per image (benchmarks/README.md): below this many
# images Keras finishes first.
MIN_IMAGES_TO_CONVERT = 600


def fast_inference(model, model_path=None, n_images=None, digest=None):
    """`model` itself, or its LiteRT twin where that is possible: float32, no GPU, every op convertible.

    Returns (predictor, engine name); the predictor has `predict_on_batch`, `input_shape` and `output_shape`.
    With `model_path` (the file `model` was loaded from; `digest`: its SHA-256 if known), the conversion is
    cached by the file's contents under ~/.cache/cxr/litert (the most recently used few). Without a cached
    conversion, a model that will see fewer than `MIN_IMAGES_TO_CONVERT` images (`n_images`) stays in Keras.
    """
    import tensorflow as tf

    # A model saved in mixed precision loads as float32 but keeps its layers' bfloat16, which LiteRT can't take.
    if tf.config.list_physical_devices("GPU") or any(layer.compute_dtype != "float32" for layer in model.layers):
        return model, "keras"
    try:
        cached = cache_path(model_path, digest) if model_path else None
        if cached and cached.is_file():
            return load_cached(cached), "litert"
        if n_images is not None and n_images < MIN_IMAGES_TO_CONVERT:
            return model, "keras"
        flatbuffer = to_flatbuffer(model)
        if cached:
            _write_cache(cached, flatbuffer)
        return LiteRTModel(flatbuffer), "litert"
    except Exception as error:  # an op LiteRT lacks: Keras gives the same answers, only slower
        warn(f"LiteRT could not run the model ({str(error).splitlines()[0][:120]}); running it in Keras")
        return model, "keras"


def cached_conversion(model_path, digest=None):
    """The cached LiteRT conversion of the model file at `model_path`, or None (none cached, or damaged).

    Using it needs neither TensorFlow nor the Keras model, so a command that finds one starts fast.
    """
    cached = cache_path(model_path, digest)
    if not cached.is_file():
        return None
    try:
        return load_cached(cached)
    except (OSError, ValueError, RuntimeError) as error:
        warn(f"{cached}: damaged LiteRT conversion ({str(error).splitlines()[0][:80]}); converting the model again")
        cached.unlink(missing_ok=True)
        return None


def to_flatbuffer(model):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every variable it captures
        return converter.convert()


def tensor_names(flatbuffer):
    """(input tensor name, output tensor name) of a converted model, as LiteRT runtimes address them."""
    interpreter = _interpreter(flatbuffer, 1)
    return interpreter.get_input_details()[0]["name"], interpreter.get_output_details()[0]["name"]


class LiteRTModel:
    """A converted model behind Keras' `predict_on_batch`, `input_shape` and `output_shape`."""

    def __init__(self, flatbuffer, num_threads=None):
        self._interpreter = _interpreter(flatbuffer, num_threads or len(os.sched_getaffinity(0)))
        source, target = self._interpreter.get_input_details()[0], self._interpreter.get_output_details()[0]
        self.input_shape = (None, *map(int, source["shape_signature"][1:]))
        self.output_shape = (None, *map(int, target["shape_signature"][1:]))
        self._input, self._output = source["index"], target["index"]
        self._interpreter.resize_tensor_input(self._input, [BATCH_SIZE, *self.input_shape[1:]])
        self._interpreter.allocate_tensors()

    def predict_on_batch(self, x):
        x = np.asarray(x, dtype=np.float32)
        outputs = []
        for start in range(0, len(x), BATCH_SIZE):
            chunk = x[start:start + BATCH_SIZE]
            padded = np.zeros((BATCH_SIZE, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk  # one batch size: resizing the interpreter would re-plan its kernels
            self._interpreter.set_tensor(self._input, padded)
            self._interpreter.invoke()
            outputs.append(self._interpreter.get_tensor(self._output)[:len(chunk)])
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.output_shape[1:]), np.float32)


def _interpreter(flatbuffer, num_threads):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # platforms without an ai-edge-litert wheel: TensorFlow's own, deprecated copy
        import warnings

        from tensorflow.lite import Interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    return Interpreter(model_content=flatbuffer, num_threads=num_threads)


def cache_path(model_path, digest=None):
    digest = (digest or file_sha256(model_path))[:24]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "cxr" / "litert" / f"{Path(model_path).stem}-{digest}.tflite"


def load_cached(path):
    model = LiteRTModel(path.read_bytes())
    path.touch()  # recently used: kept when older conversions are pruned
    return model


def _write_cache(path, flatbuffer):
    try:
        write_bytes(path, flatbuffer)
        for old in sorted(path.parent.glob("*.tflite"), key=lambda p: p.stat().st_mtime)[:-CACHED_MODELS]:
            old.unlink()
    except OSError:  # a read-only home costs the next run another conversion, nothing more
        pass
