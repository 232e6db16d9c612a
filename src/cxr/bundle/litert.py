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
import sys
import warnings
from pathlib import Path

import numpy as np

from cxr.atomic import file_sha256, write_bytes
from cxr.errors import native_output_silenced, warn

BATCH_SIZE = 4  # images per LiteRT call: 4 ran fastest of 1-16 on this project's 2-core CPUs (benchmarks/README.md)
CACHED_MODELS = 8
# A conversion costs a fixed time that LiteRT wins back per image (benchmarks/README.md): below this many
# images Keras finishes first.
MIN_IMAGES_TO_CONVERT = 600


def fast_inference(model, model_path=None, n_images=None, digest=None, tag=""):
    """`model` itself, or its LiteRT twin where that is possible: float32, no GPU, every op convertible.

    Returns (predictor, engine name); the predictor has `predict_on_batch`, `input_shape` and `output_shape`.
    With `model_path` (the file `model` was loaded from; `digest`: its SHA-256 if known), the conversion is
    cached by the file's contents under ~/.cache/cxr/litert (the most recently used few; `tag` names what
    `model` computes from that file, e.g. "taps" for `models.with_population_taps`). Without a cached
    conversion, a model that will see fewer than `MIN_IMAGES_TO_CONVERT` images (`n_images`) stays in Keras.
    """
    import tensorflow as tf

    # A model saved in mixed precision loads as float32 but keeps its layers' bfloat16, which LiteRT can't take.
    if tf.config.list_physical_devices("GPU") or any(layer.compute_dtype != "float32" for layer in model.layers):
        return keras_predictor(model), "keras"
    try:
        cached = cache_path(model_path, digest, tag) if model_path else None
        if cached and cached.is_file():
            return load_cached(cached), "litert"
        if n_images is not None and n_images < MIN_IMAGES_TO_CONVERT:
            return keras_predictor(model), "keras"
        if cached:  # an older model's first use, or a cache cleared: said, since it takes a while
            what = f" (its view at {tag.split('view')[1]}x)" if "view" in tag else ""  # one line per view
            print(f"cxr: converting {model_path}{what} to LiteRT once (about a minute on 2 cores); later runs "
                  "reuse it", file=sys.stderr, flush=True)
        flatbuffer = to_flatbuffer(model)
        if cached:
            write_cache(cached, flatbuffer)
        return LiteRTModel(flatbuffer), "litert"
    except Exception as error:  # an op LiteRT lacks: Keras gives the same answers, only slower
        warn(f"LiteRT could not run the model ({str(error).splitlines()[0][:120]}); running it in Keras")
        return keras_predictor(model), "keras"


def keras_predictor(model):
    """`model` itself, or, for a model built under a tf.distribute strategy with several replicas, a
    predictor that calls it directly: there Keras 3's `predict_on_batch` returns every replica's copy of the
    outputs (twice as many rows on two replicas)."""
    if getattr(model, "distribute_strategy", None) is None or model.distribute_strategy.num_replicas_in_sync == 1:
        return model
    return _CalledModel(model)


class _CalledModel:
    def __init__(self, model):
        import tensorflow as tf

        self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self.input_shape, self.output_shape = model.input_shape, model.output_shape

    def predict_on_batch(self, x):
        return self._call(np.asarray(x, dtype=np.float32)).numpy()


def cached_conversion(model_path, digest=None, tag=""):
    """The cached LiteRT conversion of the model file at `model_path` (`tag`: as `fast_inference`'s), or None
    (none cached, or damaged).

    Using it needs neither TensorFlow nor the Keras model, so a command that finds one starts fast.
    """
    cached = cache_path(model_path, digest, tag)
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


FLOAT_OPS = ["CONCATENATION", "MEAN", "FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"]  # the head and the taps: kept float32
# The input normalisation, the stem and blocks 1a, 2a and 2b: kept float32. LiteRT's quantization debugger put
# the stem's and block 1a's int8 outputs 2-3 quantization steps from float32's (0.3-0.6 elsewhere); with block 2
# float32 too, the noise int8 leaves in the logits halved (sd 0.38 -> 0.20 on the default's validation split;
# later blocks in float32 changed nothing), and the AUC int8 lost at another site fell from 0.0024 to 0.0005,
# for part of int8's speed (benchmarks/README.md).
FLOAT_LAYER_PREFIXES = ("rescaling", "normalization", "stem_", "block1a_", "block2")


def to_int8_flatbuffer(model, calibration_images):
    """`model` as int8 LiteRT (post-training quantization: int8 weights per channel, int8 activations whose
    ranges come from `calibration_images`, (n, S, S, 3) uint8), float32 in and out.

    The global pooling, the head and the concatenation of outputs stay float32 (LiteRT's selective
    quantization: the probabilities and each depth's features would otherwise share one int8 scale), and so do
    the layers named by FLOAT_LAYER_PREFIXES. The quantizer still rounds the float32 probabilities to int8 and
    back on their way out; that round trip is removed (`without_float_round_trips`), and the head's bias is
    corrected for the shift int8 leaves in its logits (`head_bias_corrected`).
    """
    import tensorflow as tf

    def representative():
        for image in calibration_images:
            yield [np.asarray(image[None], dtype=np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=FLOAT_OPS)
    # the converter prints every variable it captures, and the quantizer its settings from C++
    with native_output_silenced(1, 2), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the debugger's own tf.lite.Interpreter deprecation notices
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative,
                                                             debug_options=options)
        # Setting the options quantizes the calibrated model again, without calibrating it again
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=FLOAT_OPS, denylisted_nodes=_float_layer_outputs(debugger.calibrated_model))
        quantized = debugger.get_nondebug_quantized_model()
    return head_bias_corrected(without_float_round_trips(quantized), model, calibration_images)


def _editable(flatbuffer):
    """(the flatbuffer as LiteRT's schema objects, its main graph, op -> its builtin name)."""
    from tensorflow.lite.tools import flatbuffer_utils

    flat = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    return flat, flat.subgraphs[0], lambda op: flatbuffer_utils.opcode_to_name(flat, op.opcodeIndex)


def _packed(flat):
    from tensorflow.lite.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(flat))


def without_float_round_trips(flatbuffer):
    """`flatbuffer` without its QUANTIZE -> DEQUANTIZE pairs that take a float32 tensor to int8 and straight back.

    The quantizer gives a softmax's or sigmoid's output a fixed int8 scale of 1/256 even where the op itself stays
    float32, and rounds it to that on the way out: probabilities in steps of 0.004, so that every confident image
    ties at 0 or 0.996. On today's default that round trip alone cost 0.0019 of validation AUC
    (bench_int8_layers.py). Nothing is lost by skipping it: the consumer takes the float32 tensor as it was.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    flat, graph, op_name = _editable(flatbuffer)
    producers = {int(t): op for op in graph.operators for t in op.outputs}
    readers = [int(t) for op in graph.operators for t in op.inputs] + [int(t) for t in graph.outputs]
    rewired, dropped = {}, set()
    for op in graph.operators:
        source = producers.get(int(op.inputs[0])) if op_name(op) == "DEQUANTIZE" else None
        if (source is not None and op_name(source) == "QUANTIZE" and readers.count(int(op.inputs[0])) == 1
                and graph.tensors[int(source.inputs[0])].type == schema.TensorType.FLOAT32):
            rewired[int(op.outputs[0])] = int(source.inputs[0])
            dropped |= {id(op), id(source)}
    if not dropped:
        return flatbuffer
    graph.operators = [op for op in graph.operators if id(op) not in dropped]
    for op in graph.operators:
        op.inputs = np.array([rewired.get(int(t), int(t)) for t in op.inputs], dtype=np.int32)
    graph.outputs = np.array([rewired.get(int(t), int(t)) for t in graph.outputs], dtype=np.int32)
    return _packed(flat)


def head_bias_corrected(flatbuffer, model, calibration_images):
    """`flatbuffer` (int8 `model`, whose first outputs are its "predictions" layer's) with that float32 head's bias
    moved by the median shift int8 leaves in its logits on `calibration_images`, (n, S, S, 3) uint8.

    int8's errors don't average out before the head: on today's default they moved every logit the same way by
    about 0.5, as much on the calibration images as on validation (bias correction, as in Nagel et al. 2019,
    "Data-free quantization through weight equalization and bias correction", here measured on the head alone).
    """
    head = model.get_layer("predictions")
    classes, sigmoid = head.units, head.get_config()["activation"] == "sigmoid"
    x = np.asarray(calibration_images, dtype=np.float32)
    reference = np.concatenate([np.asarray(model.predict_on_batch(x[k:k + 32]))[:, :classes]
                                for k in range(0, len(x), 32)])
    quantized = LiteRTModel(flatbuffer, num_threads=1).predict_on_batch(x)[:, :classes]

    def logits(p):  # up to a constant per image for a softmax, which the bias can't move anyway
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-30, 1 - 1e-7)
        return np.log(p) - np.log1p(-p) if sigmoid else np.log(p) - np.log(p).mean(axis=1, keepdims=True)

    return moved_head_bias(flatbuffer, np.median(logits(reference) - logits(quantized), axis=0))


def moved_head_bias(flatbuffer, shift):
    """`flatbuffer` with `shift` (classes,) added to the bias of its one float32 head with that many outputs."""
    flat, graph, op_name = _editable(flatbuffer)
    heads = [op for op in graph.operators if op_name(op) == "FULLY_CONNECTED" and len(op.inputs) > 2
             and op.inputs[2] >= 0 and graph.tensors[int(op.inputs[2])].shape.tolist() == [len(shift)]]
    if len(heads) != 1:  # a head whose bias is all zeros (never trained) is converted without one
        warn(f"int8: the head's bias was not corrected (found {len(heads)} float32 heads with a bias of {len(shift)})")
        return flatbuffer
    buffer = flat.buffers[graph.tensors[int(heads[0].inputs[2])].buffer]
    bias = np.frombuffer(bytes(buffer.data), dtype=np.float32)
    buffer.data = np.frombuffer((bias + shift).astype(np.float32).tobytes(), dtype=np.uint8)
    return _packed(flat)


def _float_layer_outputs(calibrated_flatbuffer):
    """The tensor names, in a calibrated (still float32) model, of the outputs of layers named by
    FLOAT_LAYER_PREFIXES: what the quantizer's `denylisted_nodes` takes."""
    names = [tensor["name"] for tensor in _interpreter(calibrated_flatbuffer, 1).get_tensor_details()]
    # a fused op's tensor lists every name it took; the first is the op's own output
    return [name for name in names
            if any(part.startswith(FLOAT_LAYER_PREFIXES) for part in name.split(";")[0].split("/"))]


def tensor_names(flatbuffer):
    """(input tensor name, output tensor name) of a converted model, as LiteRT runtimes address them."""
    interpreter = _interpreter(flatbuffer, 1)
    return interpreter.get_input_details()[0]["name"], interpreter.get_output_details()[0]["name"]


class LiteRTModel:
    """A converted model behind Keras' `predict_on_batch`, `input_shape` and `output_shape`.

    Full chunks of BATCH_SIZE images run on one interpreter, the images left over one by one on another:
    a LiteRT call costs in proportion to its batch, so padding one image (a served request) to BATCH_SIZE
    would cost BATCH_SIZE times as much, and resizing one interpreter would re-plan its kernels each time.
    """

    def __init__(self, flatbuffer, num_threads=None):
        self._flatbuffer, self._threads = flatbuffer, num_threads or len(os.sched_getaffinity(0))
        self._runners = {}
        interpreter = self._runner(BATCH_SIZE)[0]
        source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        self.input_shape = (None, *map(int, source["shape_signature"][1:]))
        self.output_shape = (None, *map(int, target["shape_signature"][1:]))

    def _runner(self, batch):
        """(interpreter, input index, output index) planned for `batch` images, made on first use."""
        if batch not in self._runners:
            with native_output_silenced():
                interpreter = _interpreter(self._flatbuffer, self._threads)
                source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
                interpreter.resize_tensor_input(source["index"], [batch, *source["shape_signature"][1:]])
                interpreter.allocate_tensors()
            self._runners[batch] = (interpreter, source["index"], target["index"])
        return self._runners[batch]

    @property
    def flatbuffer(self):
        return self._flatbuffer

    def predict_on_batch(self, x):
        x = np.asarray(x, dtype=np.float32)
        outputs = []
        for start in range(0, len(x), BATCH_SIZE):
            chunk = x[start:start + BATCH_SIZE]
            for piece in [chunk] if len(chunk) == BATCH_SIZE else np.split(chunk, len(chunk)):
                interpreter, source, target = self._runner(len(piece))
                interpreter.set_tensor(source, np.ascontiguousarray(piece))
                interpreter.invoke()
                outputs.append(interpreter.get_tensor(target).copy())
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.output_shape[1:]), np.float32)


def _interpreter(flatbuffer, num_threads):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # platforms without an ai-edge-litert wheel: TensorFlow's own, deprecated copy
        import warnings

        from tensorflow.lite import Interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    return Interpreter(model_content=flatbuffer, num_threads=num_threads)


def cache_path(model_path, digest=None, tag=""):
    digest = (digest or file_sha256(model_path))[:24] + (f"-{tag}" if tag else "")
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "cxr" / "litert" / f"{Path(model_path).stem}-{digest}.tflite"


def load_cached(path):
    model = LiteRTModel(path.read_bytes())
    path.touch()  # recently used: kept when older conversions are pruned
    return model


def write_cache(path, flatbuffer):
    try:
        write_bytes(path, flatbuffer)
        for old in sorted(path.parent.glob("*.tflite"), key=lambda p: p.stat().st_mtime)[:-CACHED_MODELS]:
            old.unlink()
    except OSError:  # a read-only home costs the next run another conversion, nothing more
        pass
