"""Training as a loop over phases: a run can start at any phase and epoch."""

import json

import numpy as np
import pytest

from cxr.training.config import Config
from cxr.data.split import prepare_splits
from cxr.model.networks import Builder, default_frozen_layers
from cxr.training.loop import TrainingRun, default_phases, train


def test_a_run_can_start_at_phase_2_and_a_later_epoch(xray_raw, tmp_path):
    # phase 2 runs to its own cap (--finetune-epochs 3), not phase 1's (--epochs 2)
    config = Config(data_dir=xray_raw, img_size=32, epochs=2, finetune_epochs=3, batch_size=8,
                    backbone="test-efficientnet", weights="none", patience=5)
    dataset = prepare_splits(config)
    dataset.decode(config.img_size, tmp_path / "cache")
    builder = Builder()
    model = builder.classifier(config.backbone, 2, config.weights, config.img_size)
    frozen = default_frozen_layers(model, config.backbone)
    (tmp_path / "staging").mkdir()
    run = TrainingRun(builder, default_phases(config, frozen), frozen, tmp_path / "staging", tmp_path / "logs",
                      start_phase=2, initial_epoch=1)
    before = [w.copy() for w in model.get_weights()]
    result = train(model, dataset, config, run)
    assert [(e["phase"], e["epoch"]) for e in result.history] == [(2, 2), (2, 3)]
    assert set(result.seconds) == {"phase2_seconds"} and result.final_phase == 2
    assert (tmp_path / "staging" / "best_finetuned.keras").is_file()
    assert not (tmp_path / "staging" / "best_feature_extractor.keras").exists()
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
    assert any(changed)  # the upper blocks trained


@pytest.mark.parametrize("augment", ["robust", "site"])
def test_augmentation_reaches_training_views_only(augment, xray_raw, tmp_path):
    from cxr.model.networks import split_at_frozen_prefix
    from cxr.training.loop import CachedInputs

    config = Config(data_dir=xray_raw, img_size=32, batch_size=8, backbone="test-efficientnet", weights="none",
                    augment=augment, feature_views=1)
    dataset = prepare_splits(config)
    dataset.decode(config.img_size, tmp_path / "cache")
    model = Builder().classifier(config.backbone, 2, config.weights, config.img_size)
    prefix, tail, pooled = split_at_frozen_prefix(model, default_frozen_layers(model, config.backbone))
    views, val_x = CachedInputs(Builder(), model, (prefix, tail, pooled), dataset, config, tmp_path).outputs()

    def plain(split):
        return prefix.predict(np.asarray(dataset.images[dataset.splits[split]], "float32"), verbose=0)
    np.testing.assert_allclose(val_x[:], plain("val"), rtol=1e-4, atol=1e-4)  # validation: the images as they are
    assert not np.allclose(views[:], plain("train"), rtol=1e-2, atol=1e-2)  # training: augmented


@pytest.mark.slow  # several trainings compared: CI runs it after the suite (README)
def test_a_run_killed_in_phase_2_resumes_to_the_numbers_of_an_uninterrupted_run(xray_raw, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from cxr.cli import main
    from tests.conftest import TINY, kill_after_epoch

    options = ["--data-dir", str(xray_raw), "--deterministic", *TINY, "--epochs", "8", "--patience", "8"]
    assert main(["train", *options, "--output-dir", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole/reports/summary.json").read_text())

    child = subprocess.Popen([sys.executable, "-m", "cxr", "train", *options, "--output-dir", str(tmp_path / "cut")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    kill_after_epoch(child, tmp_path / "cut", phase=2)
    assert not (tmp_path / "cut/reports/summary.json").exists()

    capsys.readouterr()
    assert main(["train", *options, "--output-dir", str(tmp_path / "cut"), "--lr", "0.01", "--resume"]) == 2
    assert "other options (--lr 0.001 then, 0.01 now)" in capsys.readouterr().err
    assert main(["train", *options, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Resuming phase 2 after epoch" in out and "Phase 1:" not in out
    assert "Computing the frozen layers" not in out  # the cached outputs were reused
    resumed = json.loads((tmp_path / "cut/reports/summary.json").read_text())
    assert resumed["history"] == whole["history"]
    assert resumed["metrics"] == whole["metrics"] and resumed["operating_point"]["threshold"] == \
        whole["operating_point"]["threshold"]
    assert not (tmp_path / "cut/models/.staging").exists()
    assert main(["train", *options, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 2  # nothing left to resume


@pytest.mark.parametrize("monitor, patience", [("val_accuracy", 2), ("val_loss", 3), ("val_accuracy", 6),
                                               ("val_loss", 1)])
def test_phase_control_decides_as_the_seeds_keras_callbacks(tmp_path, monitor, patience):
    """PhaseControl owns what EarlyStopping (best weights restored), ReduceLROnPlateau and ModelCheckpoint
    (save_best_only) decided, so that a resumed run sets back one plain Progress: the same history (learning rate
    included), final weights and checkpoint as those three callbacks, with early stops and learning-rate cuts."""
    from types import SimpleNamespace

    import keras

    from cxr.training.loop import PhaseControl

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = keras.utils.to_categorical((x[:, 0] + rng.normal(0, 2, 64) > 0).astype(int), 2)

    def fit(callbacks_of):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(keras.optimizers.Adam(0.05), "categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(x[:48], y[:48], validation_data=(x[48:], y[48:]), epochs=25, batch_size=16,
                            shuffle=False, callbacks=callbacks_of(model), verbose=0).history
        return history, model.get_weights(), keras.models.load_model(tmp_path / "best.keras").get_weights()

    mode = "min" if monitor == "val_loss" else "max"
    seeds = fit(lambda model: [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=max(1, patience // 2),
                                          min_lr=1e-7),
        keras.callbacks.ModelCheckpoint(tmp_path / "best.keras", monitor=monitor, mode=mode, save_best_only=True)])
    own = fit(lambda model: [PhaseControl(SimpleNamespace(monitor=monitor, patience=patience),
                                          tmp_path / "best.keras", model)])
    assert own[0] == seeds[0] and len(own[0]["loss"]) < 25
    for mine, theirs in zip(own[1:], seeds[1:]):
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))
    if (monitor, patience) == ("val_accuracy", 2):
        assert len(set(own[0]["learning_rate"])) > 1  # the plateau cut the learning rate


def test_a_state_saved_by_an_earlier_version_is_refused_in_one_line(tmp_path):
    """An unfinished run saved with Keras callbacks' counters (before PhaseControl) has no Progress to go on from."""
    from cxr.errors import UserError
    from cxr.training.resume import RunState

    folder = tmp_path / "out" / "models" / ".staging" / "resume"
    folder.mkdir(parents=True)
    np.savez(folder / "epoch-2-1.npz", **{"model-0": np.zeros(3)})
    (folder / "state.json").write_text(json.dumps({"fingerprint": {}, "phase": 2, "epoch": 1, "arrays": "epoch-2-1.npz",
                                                   "callbacks": {"early": {"wait": 0}}}))
    with pytest.raises(UserError, match="saved by an earlier version of cxr; run without --resume to start over"):
        RunState.load(folder.parent, {"options": {}, "data": None})
