"""Phase 3 (`--distill`): one view of each image trained to answer as the test-time views do.

Averaging zoomed views (`models.with_test_time_scales`) raised AUC at another site, but it runs the network once
per view. After phases 1 and 2, the fine-tuned model is the teacher: a frozen copy with the run's test-time
scales. The student is the model itself, seeing the image as it is. Its blocks past the frozen point train (as
in phase 2) to reproduce the teacher's mean pooled features, the input of the linear head, so that the head
reads from one view what it read from the views' mean. It trains on DISTILL_VIEWS freshly augmented views of
every training image. The frozen prefix's outputs and the teacher's features are computed once (LiteRT where
it runs) and kept in the staging folder, as phase 2's are.

The student is served only when its validation AUC is within AUC_TOLERANCE of the views'. Otherwise the model
gets the teacher's weights back and the views are served. Either way the decision is recorded
(class_names.json "distillation", the model card, summary.json).
"""

import time

import keras
import numpy as np

from cxr.atomic import atomic_path
from cxr.data.pipeline import make_dataset
from cxr.errors import UserError
from cxr.litert import fast_inference
from cxr.models import head_on_features, unfreeze_backbone, with_test_time_scales
from cxr.precision import mean_auc
from cxr.train import staged_array, training_order

DISTILL_VIEWS = 2  # augmented views of each training image the student learns from
AUC_TOLERANCE = 0.002
EPOCHS = 3  # epochs of one training set's worth of steps
LEARNING_RATE = 1e-4
SEED_OFFSET = 1000  # other augmentation seeds than the phase-2 cache's views


def distill(model, dataset, config, run):
    """Train the flat classifier `model` in place into a one-view student of its own test-time views
    (`config.test_time_scales`); returns the record of what is served:
    {"served_scales", "teacher_scales", "val_auc_views", "val_auc_one_view", "served", "reason", "seconds"}.

    `run` is the `train.TrainingRun` of phases 1 and 2 (its builder, frozen point and staging folder).
    """
    started = time.perf_counter()
    scales = list(config.test_time_scales)
    teacher_weights = model.get_weights()
    with run.builder.scope():
        copy = keras.models.clone_model(model)
        copy.set_weights(teacher_weights)
        teacher = with_test_time_scales(copy, scales)
        teacher_features = keras.Model(teacher.input, teacher.get_layer("mean_over_views").output,
                                       name="teacher_features")
    parts = run.builder.split_at_frozen_prefix(model, run.frozen_layers, config.backbone)
    if parts is None:
        raise UserError(f"--distill trains the layers past the frozen point, and --frozen-layers {run.frozen_layers} "
                        "falls in the stem; choose a larger one")
    prefix, _, student = parts
    rows, val_rows = dataset.splits["train"], dataset.splits["val"]
    pairs = dict(prefix=prefix, teacher_features=teacher_features, dataset=dataset, config=config,
                 folder=run.staging_dir)
    x, targets = _pairs(rows=rows, views=DISTILL_VIEWS, augment=config.augment, name="distill-train", **pairs)
    val_x, val_targets = _pairs(rows=val_rows, views=1, augment=None, name="distill-val", **pairs)

    print(f"Phase 3: training one view to answer as the mean of the views {scales} "
          f"({DISTILL_VIEWS} augmented views of each training image)", flush=True)
    unfreeze_backbone(model, run.frozen_layers)
    with run.builder.scope():
        student.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
    order, steps = training_order(len(x), len(rows), config.batch_size, EPOCHS, config.seed + SEED_OFFSET)
    # no checkpoint: a student that fails the guard is not kept, and one that passes is the saved model
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
                 keras.callbacks.TensorBoard(log_dir=str(run.log_dir / "phase3")), keras.callbacks.TerminateOnNaN()]
    student.fit(make_dataset(x, order, targets[order], config.batch_size), steps_per_epoch=steps, epochs=EPOCHS,
                validation_data=make_dataset(val_x, np.arange(len(val_x)), val_targets, config.batch_size),
                callbacks=callbacks, shuffle=False, verbose=2)

    head = head_on_features(model)
    _, y = dataset.split("val")
    classes = len(dataset.class_names)
    auc_views = mean_auc(y, head.predict(val_targets, verbose=0, batch_size=256), dataset.multi_label, classes)
    student_features = student.predict(make_dataset(val_x, np.arange(len(val_x)), val_targets, config.batch_size),
                                       verbose=0)
    auc_one = mean_auc(y, head.predict(student_features, verbose=0, batch_size=256), dataset.multi_label, classes)
    passed = auc_views is not None and auc_one is not None and auc_one >= auc_views - AUC_TOLERANCE
    record = {"teacher_scales": scales, "val_auc_views": auc_views, "val_auc_one_view": auc_one,
              "seconds": round(time.perf_counter() - started, 1)}
    if passed:
        record |= {"served": "one view", "served_scales": [1.0],
                   "reason": f"its validation AUC is within {AUC_TOLERANCE} of the views'"}
    else:
        model.set_weights(teacher_weights)
        why = ("no validation AUC to compare (one class only)" if auc_views is None or auc_one is None else
               f"its validation AUC is {auc_views - auc_one:.4f} lower than the views' (at most {AUC_TOLERANCE} "
               "allowed)")
        record |= {"served": "views", "served_scales": scales, "reason": why}
    print(f"Phase 3: serving {record['served']} ({record['reason']}; validation AUC views "
          f"{_number(auc_views)}, one view {_number(auc_one)})", flush=True)
    return record


def _pairs(prefix, teacher_features, dataset, config, folder, rows, views, augment, name):
    """(the frozen prefix's outputs, the teacher's features) for `views` views of `rows` (augmented by `augment`
    unless None), stacked view after view: a `DiskArray` and an in-memory (n, features) array, both kept in the
    staging folder `folder`, where a resumed run finds them."""
    features_path = folder / f"{name}-teacher.npy"
    shape = (views * len(rows), *prefix.output.shape[1:])
    n_images = views * len(rows)
    collected = []

    def blocks():
        print(f"Phase 3: computing the teacher's features and the frozen layers for {n_images} images "
              f"({views} view{'s' if views > 1 else ''} of {len(rows)})", flush=True)
        prefix_runner, _ = fast_inference(prefix, n_images=n_images)
        teacher_runner, _ = fast_inference(teacher_features, n_images=n_images)
        for view in range(views):
            ds = make_dataset(dataset.images, rows, dataset.labels[rows], config.batch_size,
                              augment=augment, seed=config.seed + SEED_OFFSET + view)
            for x, _ in ds:
                x = x.numpy()
                collected.append(teacher_runner.predict_on_batch(x))
                yield prefix_runner.predict_on_batch(x)

    if not features_path.is_file():
        (folder / f"{name}.npy").unlink(missing_ok=True)  # its features were lost: compute both again
    x = staged_array(folder, name, shape, blocks)
    if collected:
        with atomic_path(features_path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(collected))
    return x, np.load(features_path)


def _number(value):
    return "n/a" if value is None else f"{value:.4f}"
