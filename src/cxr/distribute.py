"""The tf.distribute strategy a run trains under (`--strategy`).

- none: the default strategy, one device.
- mirrored: `MirroredStrategy` over this machine's GPUs (its logical CPUs when it has none): one replica per
  device, gradients all-reduced every step.
- auto: mirrored when more than one GPU is visible, else none.

`--batch-size` is the global batch: each step takes batch-size images in all, split evenly between the
replicas (per replica: batch-size / replicas). Every model and optimizer of a run is built under the strategy's
scope by `models.Builder`.

Several machines (MultiWorkerMirroredStrategy from TF_CONFIG) are not offered: with Keras 3.15 on TensorFlow
2.21, `Model.fit` under that strategy fails on two workers (keras-team/keras#20585; benchmarks/README.md).
"""

STRATEGIES = ("auto", "none", "mirrored")


def make_strategy(name):
    """(tf.distribute strategy or None, {"name", "replicas"} for summary.json); `name` is one of STRATEGIES."""
    import tensorflow as tf

    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if name == "none":
        return None, {"name": "none", "replicas": 1}
    devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    return strategy, {"name": name, "replicas": int(strategy.num_replicas_in_sync)}
