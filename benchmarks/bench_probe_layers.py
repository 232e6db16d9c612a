"""How far do frozen ImageNet Lite0 features reach at another site? A linear probe on each layer's pooled
output, and on a few layers together (issue 13).

    .venv/bin/python benchmarks/bench_probe_layers.py [--work /tmp/probe-layers]

The train folder is split as `cxr train` splits it (seed 42); every image is decoded at 224 px by cxr and
passed once, un-augmented, through Lite0 with ImageNet weights. For each layer (the residual adds and the
expanded activations of blocks 4-7, and the top), the global average of its output is standardised and fed
to a scikit-learn logistic regression (class-balanced); C is chosen among 0.001, 0.01, 0.1 by validation AUC.
Prints validation, internal test and external_dev AUC. external_dev is only measured: nothing is chosen on it.
"""

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chest_xray"
CS = (0.001, 0.01, 0.1)


def pooled_layer_outputs(work):
    """{split: {layer name: (n, channels) array}} and {split: labels} for train, val, test and external_dev."""
    import keras
    import tensorflow as tf

    from cxr.config import Config
    from cxr.data.split import prepare_splits, read_labelled_folder
    from cxr.models import build_classifier

    dataset = prepare_splits(Config(data_dir=DATA, backbone="efficientnet-lite0"))
    dataset.decode(224, work / "cache")
    external = read_labelled_folder(DATA / "external_dev", dataset.class_names)
    external.decode(224, work / "cache")
    model = build_classifier("efficientnet-lite0", 2, "imagenet", 224)
    names = [layer.name for layer in model.layers if layer.name.startswith(("block4", "block5", "block6", "block7"))
             and layer.name.endswith(("_add", "expand_activation"))] + ["top_activation"]
    pooled = keras.Model(model.input, [keras.layers.GlobalAveragePooling2D()(model.get_layer(n).output) for n in names])
    call = tf.function(lambda x: pooled(x, training=False))
    features, labels = {}, {}
    for split, data, name in (("train", dataset, "train"), ("val", dataset, "val"), ("test", dataset, "test"),
                              ("external_dev", external, "evaluated")):
        rows, labels[split] = data.split(name)
        batches = [call(data.images[rows[i:i + 64]].astype(np.float32)) for i in range(0, len(rows), 64)]
        features[split] = {n: np.concatenate([b[k].numpy() for b in batches]) for k, n in enumerate(names)}
    return names, features, labels


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
    args = parser.parse_args()
    names, features, labels = pooled_layer_outputs(args.work)
    groups = {name: [name] for name in names}
    groups["every add of blocks 4-6"] = [n for n in names if n.endswith("_add")]
    groups["all of the above"] = names
    print(f"{'features':30s} {'C':>6s} {'val AUC':>8s} {'test AUC':>9s} {'external_dev AUC':>17s}")
    for label, layers in groups.items():
        c, aucs = probe(features, labels, layers)
        print(f"{label:30s} {c:6g} {aucs['val']:8.4f} {aucs['test']:9.4f} {aucs['external_dev']:17.4f}", flush=True)


if __name__ == "__main__":
    main()
