"""The tf.distribute strategy a run trains under (`--strategy`), and which process of a job writes.

- none: the default strategy, one device.
- mirrored: `MirroredStrategy` over this machine's GPUs (its logical CPUs when it has none): one replica per
  device, gradients all-reduced every step.
- multiworker: `MultiWorkerMirroredStrategy` over the machines that `TF_CONFIG` lists (how Kubernetes TFJob,
  Slurm scripts and Vertex AI launch Keras jobs): every worker runs the same `cxr train` command; gradients are
  all-reduced across all of them every step.
- auto: mirrored when more than one GPU is visible, else none.

`--batch-size` is the global batch: each step takes batch-size images in all, split evenly between the
replicas (per replica: batch-size / replicas). Every model and optimizer of a run is built under the strategy's
scope by `models.Builder`.

Only the chief writes (the task of type "chief", else worker 0, as in TensorFlow's own convention): other
workers train in step with it and put their checkpoints, caches and logs in a temporary folder that is removed
when they end.
"""

import json
import os
from dataclasses import dataclass

from cxr.errors import UserError

STRATEGIES = ("auto", "none", "mirrored", "multiworker")


@dataclass
class Distribution:
    """The strategy of a run (None: TensorFlow's default) and this process's place in the job (which one writes:
    `cluster_role`)."""

    strategy: object
    name: str
    replicas: int = 1
    workers: int = 1
    task: str = "worker 0"  # "<type> <index>" from TF_CONFIG

    def record(self):
        """What summary.json keeps: {"name", "replicas"} (and "workers" for a multi-worker job)."""
        return {"name": self.name, "replicas": self.replicas} | ({"workers": self.workers} if self.workers > 1 else {})


def cluster_role(environ=os.environ):
    """(workers in the job, "<type> <index>" of this task, whether this task is the chief) from `TF_CONFIG`;
    UserError naming what is missing when it is absent or malformed."""
    text = environ.get("TF_CONFIG")
    if not text:
        raise UserError("--strategy multiworker needs TF_CONFIG, the job's cluster and this worker's task, e.g. "
                        '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
                        '"index": 0}} (see the README, "Several machines")')
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config["task"]
        kind, index = task["type"], int(task["index"])
        members = {name: list(addresses) for name, addresses in cluster.items()}
        assert kind in members and 0 <= index < len(members[kind])
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError):
        raise UserError("TF_CONFIG is not a valid cluster description: it needs \"cluster\" (e.g. {\"worker\": "
                        "[\"host1:12345\", \"host2:12345\"]}) and \"task\" ({\"type\": \"worker\", \"index\": N} "
                        "with N a position in that list)") from None
    workers = len(members.get("chief", [])) + len(members.get("worker", []))
    is_chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in members)
    return workers, f"{kind} {index}", is_chief


def make_strategy(name):
    """The `Distribution` for `name`, one of STRATEGIES; for multiworker, this process joins the job's cluster
    (TF_CONFIG) and waits for the other workers."""
    import tensorflow as tf

    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if name == "none":
        return Distribution(None, "none")
    if name == "multiworker":
        workers, task, _ = cluster_role()
        _patch_keras_for_multiworker()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return Distribution(strategy, name, int(strategy.num_replicas_in_sync), workers, task)
    devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    return Distribution(strategy, name, int(strategy.num_replicas_in_sync))


def _patch_keras_for_multiworker():
    """Make Keras 3's `Model.fit` run under MultiWorkerMirroredStrategy on more than one worker.

    Two of its steps fail there (keras-team/keras#20585, open): before the first epoch it takes the MEAN of a
    distributed *data* batch to build the model's metrics and optimizer (only shapes are needed: this worker's
    part of the batch will do), and after every step it reduces the scalar logs along an axis 0 they do not
    have (a scalar is reduced whole). Nothing else changes; a Keras without these functions is left alone.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_cxr_patched", False) or not hasattr(trainer, "reduce_per_replica"):
        return
    multi_worker = trainer._collective_all_reduce_multi_worker
    reduce_per_replica = trainer.reduce_per_replica
    symbolic_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_scalars_whole(values, strategy, reduction):
        if multi_worker(strategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0), values)
        return reduce_per_replica(values, strategy, reduction)

    def build_from_local_batch(self, iterator=None, data_batch=None):
        if iterator is None or not multi_worker(self.distribute_strategy):
            return symbolic_build(self, iterator, data_batch)
        for _, _, batches in iterator:
            local = self.distribute_strategy.experimental_local_results
            data_batch = tf.nest.map_structure(lambda v: local(v)[0], next(batches))
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_scalars_whole
    trainer.TensorFlowTrainer._maybe_symbolic_build = build_from_local_batch
    trainer._cxr_patched = True
