"""tf.distribute on CPU. `--strategy mirrored`: MirroredStrategy over two logical CPU devices trains, writes
the usual artifacts, predicts one row per image and resumes after a kill. `--strategy multiworker`: two worker
processes on 127.0.0.1 (TF_CONFIG, free ports) train one job; only the chief writes. Each run is a child
process: logical devices and the cluster must be set before TensorFlow starts."""

import json
import os
import socket
import subprocess
import sys

import pytest

from cxr.training.distribute import cluster_role
from tests.conftest import TINY, kill_after_epoch

TWO_CPUS = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cxr.cli import main

sys.exit(main(sys.argv[1:]))
"""


def on_two_cpus(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", TWO_CPUS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.fixture
def options(xray_raw):
    return ["train", "--data-dir", str(xray_raw), "--strategy", "mirrored", "--deterministic", *TINY,
            "--epochs", "3", "--patience", "3", "--bootstrap", "20"]


@pytest.mark.slow  # several trainings compared: CI runs it after the suite (README)
def test_a_mirrored_run_writes_the_artifacts_predicts_and_resumes_after_a_kill_to_the_same_numbers(options, xray_raw,
                                                                                                    tmp_path):
    whole_run = on_two_cpus(*options, "--output-dir", str(tmp_path / "whole"))
    _, err = whole_run.communicate(timeout=600)
    assert whole_run.returncode == 0, err[-3000:]
    whole = json.loads((tmp_path / "whole/reports/summary.json").read_text())
    assert whole["strategy"] == {"name": "mirrored", "replicas": 2} and whole["config"]["strategy"] == "mirrored"
    assert whole["metrics"]["n_images"] == sum(whole["counts"]["test"].values())
    assert [e["epoch"] for e in whole["history"] if e["phase"] == 1] == [1, 2, 3]
    for name in ("model.h5", "class_names.json", "best_feature_extractor.keras", "best_finetuned.keras"):
        assert (tmp_path / "whole/models" / name).is_file()
    images = sorted((xray_raw / "test").rglob("*.jpeg"))
    predicted = subprocess.run([sys.executable, "-m", "cxr", "predict", *map(str, images), "--model",
                                str(tmp_path / "whole/models/model.h5"), "--format", "json"],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0 and len(json.loads(predicted.stdout)) == len(images)

    kill_after_epoch(on_two_cpus(*options, "--output-dir", str(tmp_path / "cut")), tmp_path / "cut", phase=1)
    resumed = on_two_cpus(*options, "--output-dir", str(tmp_path / "cut"), "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming phase 1 after epoch" in out
    summary = json.loads((tmp_path / "cut/reports/summary.json").read_text())
    assert [(e["phase"], e["epoch"]) for e in summary["history"]] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert summary["history"] == whole["history"] and summary["metrics"] == whole["metrics"]


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(args, tmp_path, n=2):
    """`cxr train args` as the n workers of one job on 127.0.0.1 (TF_CONFIG), each with its own TMPDIR."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}
    workers = []
    for index in range(n):
        tmp = tmp_path / f"tmp-worker{index}"
        tmp.mkdir(exist_ok=True)
        env = os.environ | {"TMPDIR": str(tmp), "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                          "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen([sys.executable, "-m", "cxr", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env))
    return workers


def finish(workers, timeout=600):
    results = [worker.communicate(timeout=timeout) for worker in workers]
    for worker, (_, err) in zip(workers, results):
        assert worker.returncode == 0, err[-3000:]
    return [out for out, _ in results]


@pytest.fixture
def worker_options(xray_raw):
    return ["train", "--data-dir", str(xray_raw), "--deterministic", *TINY, "--epochs", "2", "--patience", "2",
            "--bootstrap", "20"]


def test_multiworker_without_a_valid_tf_config_is_one_clear_line(worker_options, tmp_path):
    for tf_config, says in ((None, "needs TF_CONFIG"), ('{"cluster": {"worker": ["a:1"]}}', "not a valid cluster"),
                            ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
                             "not a valid cluster")):
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"} | ({"TF_CONFIG": tf_config} if tf_config else {})
        result = subprocess.run([sys.executable, "-m", "cxr", *worker_options, "--strategy", "multiworker",
                                 "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_chief_is_the_chief_task_else_worker_0():
    cluster = {"worker": ["a:1", "b:1"]}
    role = lambda c, t, i: cluster_role({"TF_CONFIG": json.dumps({"cluster": c, "task": {"type": t, "index": i}})})
    assert role(cluster, "worker", 0) == (2, "worker 0", True)
    assert role(cluster, "worker", 1) == (2, "worker 1", False)
    assert role(cluster | {"chief": ["c:1"]}, "worker", 0) == (3, "worker 0", False)
    assert role(cluster | {"chief": ["c:1"]}, "chief", 0) == (3, "chief 0", True)


@pytest.mark.slow  # several trainings compared: CI runs it after the suite (README)
def test_two_workers_leave_one_set_of_artifacts_match_one_worker_and_resume_after_a_kill(worker_options, xray_raw,
                                                                                          tmp_path):
    job = [*worker_options, "--strategy", "multiworker", "--epochs", "3", "--patience", "3"]
    outputs = finish(start_workers([*job, "--output-dir", str(tmp_path / "whole")], tmp_path))
    assert "worker 1: training done; the chief writes the model and reports" in outputs[1]
    assert "Outputs in" in outputs[0] and "Outputs in" not in outputs[1]
    # no storage is shared: each worker decodes and runs the frozen layers itself, into its own folder
    assert all("Computing the frozen layers once" in out for out in outputs)
    whole = json.loads((tmp_path / "whole/reports/summary.json").read_text())
    assert whole["strategy"] == {"name": "multiworker", "replicas": 2, "workers": 2}
    assert (tmp_path / "whole/models/model.h5").is_file()
    # the other worker's folder is gone; nothing else was written beside the job's outputs and the data's split
    assert list((tmp_path / "tmp-worker1").glob("cxr-worker-*")) == []
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"data", "whole", "tmp-worker0", "tmp-worker1"}
    assert sorted(p.name for p in xray_raw.iterdir()) == ["raw", "split.json", "test", "train", "val"]

    one = subprocess.run([sys.executable, "-m", "cxr", *worker_options, "--epochs", "3", "--patience", "3",
                          "--strategy", "none", "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    alone = json.loads((tmp_path / "one/reports/summary.json").read_text())
    # the same global batches; only dropout's random draws differ between the two
    assert [(e["phase"], e["epoch"]) for e in whole["history"]] == [(e["phase"], e["epoch"]) for e in alone["history"]]
    for job_epoch, alone_epoch in zip(whole["history"], alone["history"]):
        assert abs(job_epoch["loss"] - alone_epoch["loss"]) < 0.05
        assert abs(job_epoch["val_loss"] - alone_epoch["val_loss"]) < 0.05
    assert abs(whole["metrics"]["auc"] - alone["metrics"]["auc"]) < 0.15

    chief, other = start_workers([*job, "--output-dir", str(tmp_path / "cut")], tmp_path)
    kill_after_epoch(chief, tmp_path / "cut", phase=1)
    other.kill()
    other.wait()
    outputs = finish(start_workers([*job, "--output-dir", str(tmp_path / "cut"), "--resume"], tmp_path))
    assert all("Resuming phase 1 after epoch" in out for out in outputs)
    assert list((tmp_path / "tmp-worker1").glob("cxr-worker-*")) == []  # the killed worker's folder too
    summary = json.loads((tmp_path / "cut/reports/summary.json").read_text())
    assert [(e["phase"], e["epoch"]) for e in summary["history"]] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert summary["history"] == whole["history"] and summary["metrics"] == whole["metrics"]
