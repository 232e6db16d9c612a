"""Run a Keras model's forward pass through LiteRT (TensorFlow Lite) on CPU.

LiteRT's XNNPACK kernels run EfficientNet-Lite0 about three times faster than Keras on this project's 2-core
CPU (see benchmarks/README.md) and agree with it to float32 rounding (about 1e-6), so inference-only work on
a machine without a GPU (the frozen-layer pass of training, `cxr predict`) goes through here. Training,
Grad-CAM and anything else that needs gradients stays in Keras.
"""

import contextlib
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from cxr.atomic import write_bytes
from cxr.errors import warn

BATCH_SIZE = 8  # XNNPACK's speed is flat from 1 to 32 images per call on 2 cores; 8 keeps padding waste small
CACHED_MODELS = 8


def fast_inference(model, model_path=None, enabled=True):
    """`model` itself, or its LiteRT twin where that is possible: float32, no GPU, every op convertible.

    Returns (predictor, engine name); the predictor has `predict_on_batch`, `input_shape` and `output_shape`.
    With `model_path` (the file `model` was loaded from), the conversion, about 10 s, is cached by the file's
    contents under ~/.cache/cxr/litert (the 8 most recently used models).
    """
    import tensorflow as tf

    if not enabled or tf.config.list_physical_devices("GPU") or model.compute_dtype != "float32":
        return model, "keras"
    try:
        return LiteRTModel(model, _cached_flatbuffer(model, model_path) if model_path else to_flatbuffer(model)), \
            "litert"
    except Exception as error:  # an op LiteRT lacks: Keras gives the same answers, only slower
        warn(f"LiteRT could not run the model ({str(error).splitlines()[0][:120]}); running it in Keras")
        return model, "keras"


def to_flatbuffer(model):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every variable it captures
        return converter.convert()


class LiteRTModel:
    """A converted model behind Keras' `predict_on_batch`, `input_shape` and `output_shape`."""

    def __init__(self, model, flatbuffer, num_threads=None):
        self.input_shape, self.output_shape = model.input_shape, model.output_shape
        self._interpreter = _interpreter(flatbuffer, num_threads or len(os.sched_getaffinity(0)))
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
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


def _cached_flatbuffer(model, model_path):
    import tensorflow as tf

    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:24]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = cache_home / "cxr" / "litert" / f"{Path(model_path).stem}-{digest}-tf{tf.__version__}.tflite"
    if path.is_file():
        path.touch()  # recently used: kept when older conversions are pruned
        return path.read_bytes()
    flatbuffer = to_flatbuffer(model)
    try:
        write_bytes(path, flatbuffer)
        for old in sorted(path.parent.glob("*.tflite"), key=lambda p: p.stat().st_mtime)[:-CACHED_MODELS]:
            old.unlink()
    except OSError:  # a read-only home only costs the next run another conversion
        pass
    return flatbuffer
