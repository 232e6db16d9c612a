"""The other test-time views only for the images the first view leaves uncertain.

A model with test-time scales (`networks.with_test_time_scales`) averages its views' pooled features before a
linear head, so its output is the activation of the mean of its views' logits, and the views can run as separate
one-view models whose outputs `combine` gives back exactly. The first view is the image as it is, with the
population check's taps (`networks.with_population_taps`, whose features read that view alone), so it yields the
features and a first answer for every image. The other views run only where that answer is uncertain
(`Task.uncertain`: a probability further than `margin` from both 0 and 1); elsewhere the first view's answer
stands, and where they run, `Task.combine` gives back the model's own output.

At the end of training (`choose`, called by `serving.choose` at the precision served: float32, or int8 with one
conversion per view), the largest margin of MARGINS that keeps the validation split within half the int8 guard's
tolerances of every view's outputs at that precision (mean AUC within AUC_TOLERANCE / 2, calibrated probabilities
within PROBABILITY_TOLERANCE / 2) is kept, if serving that way is at least MIN_SPEEDUP times as fast on this
machine, both in the arithmetic it saves (`best_speedup`: with most images needing every view there is nothing to
gain, whatever a short timing says) and as timed. The choice goes into class_names.json ("inference" ->
"views_on_demand") and the model card; `--precision float32` or `int8` serves every view.
"""

import numpy as np

MARGINS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
EVERY_VIEW = -1.0  # a margin every answer is further than from certain: every view for every image
MIN_SPEEDUP = 1.05  # a smaller gain is within the noise of timing a few dozen images
REBUILD_TOLERANCE = 1e-4  # float32 rounding: the views give back the model's own outputs, or they are not its views
TIMED_IMAGES = 128


def best_speedup(views, share_with_every_view):
    """How many times as fast the views on demand can be at most: `views` views for every image against one for
    every image and the others for `share_with_every_view` of them, counting only the networks' arithmetic."""
    return views / (1 + share_with_every_view * (views - 1))


class ViewsOnDemand:
    """A predictor as the model with every view (`predict_on_batch`, `input_shape`, `output_shape`: (n, classes
    + features)) that runs the views other than the first only on the images `uncertain` picks.

    `first`: the first view's predictor, (n, S, S, 3) -> (n, classes + features); `others`: the other views'
    predictors, (n, S, S, 3) -> (n, classes); `task`: the model's `cxr.model.task.Task`.
    """

    def __init__(self, first, others, task, margin):
        self.first, self.others, self.task, self.margin = first, list(others), task, margin
        self.classes = task.outputs
        self.input_shape, self.output_shape = first.input_shape, first.output_shape

    def predict_on_batch(self, x):
        x = np.asarray(x, dtype=np.float32)
        outputs = np.array(self.first.predict_on_batch(x), dtype=np.float64)
        first = outputs[:, :self.classes]
        need = self.task.uncertain(first, self.margin)
        if need.any():
            views = [first[need], *(np.asarray(o.predict_on_batch(x[need]))[:, :self.classes] for o in self.others)]
            outputs[need, :self.classes] = self.task.combine(views)
        return outputs


def int8_predictor(flatbuffers, task, margin=None):
    """The predictor of int8 conversions ({"": the model with its taps, or its first view's; "view0.9": another
    view's, ...}): one LiteRT model, or the views combined, on demand at `margin` (None: every view)."""
    from cxr.bundle.litert import LiteRTModel

    first = LiteRTModel(flatbuffers[""])
    others = [LiteRTModel(data) for tag, data in flatbuffers.items() if tag]
    if not others:
        return first
    return ViewsOnDemand(first, others, task, EVERY_VIEW if margin is None else margin)


def choose(task, views, dataset, all_views):
    """(record, the `ViewsOnDemand` predictor or None): the margin fitted on the validation split of `dataset`
    for a model of `task` (`cxr.model.task.Task`) with several test-time views served at one precision: `views` is
    (its first view's predictor, [the other views' predictors], its predictor with every view), and `all_views`
    its (n, classes) outputs with every view on the validation images. The predictor is given where it passes
    (`serving.choose` serves it)."""
    from cxr.model.inference import predict_outputs
    from cxr.bundle import fidelity
    from cxr.bundle.fidelity import calibrated, speeds
    from cxr.evaluate.scoring import scoring

    rows, y = dataset.split("val")
    classes = task.outputs
    first_view, other_views, every = views
    first_outputs = predict_outputs(first_view, dataset.images, rows)[:, :classes]
    every_view = task.combine([first_outputs, *(predict_outputs(v, dataset.images, rows)[:, :classes]
                                                for v in other_views)])
    record = {"margin": None, "rebuilt_difference": float(np.max(np.abs(every_view - all_views))),
              "auc_tolerance": fidelity.AUC_TOLERANCE / 2, "probability_tolerance": fidelity.PROBABILITY_TOLERANCE / 2}
    auc_all = scoring(task).auc(y, all_views)
    if record["rebuilt_difference"] > REBUILD_TOLERANCE:
        return _refused(record, f"the views' outputs don't add up to the model's (by up to "
                                f"{record['rebuilt_difference']:.1e})")
    if auc_all is None:
        return _refused(record, "the validation split holds one class, so AUC can't be compared")
    reference = calibrated(y, all_views, all_views, task)
    trials = []
    for margin in MARGINS:
        need = task.uncertain(first_outputs, margin)
        served = np.where(need[:, None], every_view, first_outputs)
        trials.append({"margin": margin, "share_with_every_view": round(float(need.mean()), 4),
                       "val_auc": scoring(task).auc(y, served),
                       "max_calibrated_probability_difference": round(float(np.max(np.abs(
                           calibrated(y, all_views, served, task) - reference))), 4)})
    record |= {"val_auc_every_view": auc_all, "trials": trials}
    kept = [t for t in trials if auc_all - t["val_auc"] <= fidelity.AUC_TOLERANCE / 2
            and t["max_calibrated_probability_difference"] <= fidelity.PROBABILITY_TOLERANCE / 2]
    if not kept:
        return _refused(record, f"no margin keeps validation within {fidelity.AUC_TOLERANCE / 2} of every view's AUC and "
                                f"{fidelity.PROBABILITY_TOLERANCE / 2} of its calibrated probabilities")
    best = kept[-1]
    at_most = best_speedup(1 + len(other_views), best["share_with_every_view"])
    if at_most < MIN_SPEEDUP:
        return _refused(record, f"at margin {best['margin']:g} {best['share_with_every_view']:.0%} of validation "
                                f"images need every view, so it can be at most {at_most:.2f}x as fast")
    on_demand = ViewsOnDemand(first_view, other_views, task, best["margin"])
    timed = dataset.images[rows[np.linspace(0, len(rows) - 1, min(TIMED_IMAGES, len(rows))).astype(int)]]
    rates = speeds({"every_view": every, "on_demand": on_demand}, timed)
    record["images_per_second"] = {k: round(v, 1) for k, v in rates.items()}
    if rates["on_demand"] < MIN_SPEEDUP * rates["every_view"]:
        return _refused(record, f"at margin {best['margin']:g} ({best['share_with_every_view']:.0%} of validation "
                                f"images need every view) it is not at least {MIN_SPEEDUP}x as fast on this machine "
                                f"({rates['on_demand']:.0f} vs {rates['every_view']:.0f} images/s)")
    record |= {"margin": best["margin"], "share_with_every_view": best["share_with_every_view"],
               "val_auc_on_demand": best["val_auc"],
               "max_calibrated_probability_difference": best["max_calibrated_probability_difference"],
               "reason": f"passed its guard: {best['share_with_every_view']:.0%} of validation images need every "
                         f"view, {rates['on_demand'] / rates['every_view']:.2f}x as fast"}
    print(f"Views on demand: every view only where the first view's answer is further than {best['margin']:g} from "
          f"certain ({record['reason']}; validation AUC every view {auc_all:.4f}, on demand {best['val_auc']:.4f})",
          flush=True)
    return record, on_demand


def _refused(record, reason):
    print(f"Views on demand: not served ({reason}); every view runs for every image", flush=True)
    return record | {"reason": reason}, None
