"""How a saved model is served: one immutable plan, chosen once after training and resolved once at loading.

A `ServingPlan` says which precision runs (float32 or int8 LiteRT) and whether the test-time views beyond the
first run for every image or only where the first view leaves the answer uncertain (a margin). Training chooses
it in one place (`choose`): int8's guard (`cxr.bundle.precision`), then, where float32 is served with several
views, the views' own guard (`cxr.bundle.views_on_demand`). The choice and every number behind it are recorded
in the model's metadata ("inference"). Every command then gets its plan from `ServingPlan.resolve`: that record
and what the user asks for with `--precision`. Which engine runs the plan (LiteRT, or Keras where LiteRT can't)
is a fact of the machine, found when the predictor is built.
"""

from dataclasses import dataclass

from cxr.errors import UserError

PRECISIONS = ("auto", "float32", "int8")
INT8_FILE = "model.int8.tflite"  # beside model.h5, where int8 is served (with one conversion per view: the first)


def int8_file(tag):
    """The file name of the int8 conversion `tag` names ("view0.9": that view's; "*": a pattern for any view's)."""
    return f"model.int8.{tag}.tflite" if tag else INT8_FILE


@dataclass(frozen=True)
class ServingPlan:
    """`precision`: "float32" or "int8"; `margin`: the views beyond the first run only for the images whose first
    answer is further than this from certain (None: every view for every image); `asked`: the `--precision` it
    was resolved for ("auto": training's choice)."""

    precision: str = "float32"
    margin: float | None = None
    asked: str = "auto"

    @classmethod
    def resolve(cls, record, asked="auto", int8=None, model_path="the model"):
        """The plan for training's `record` ("inference" in the metadata; None for a model trained before cxr
        had one) and the precision `asked` for. `int8`: (the int8 conversion's file, whether it is there or in
        memory); int8 asked of a model without one is a UserError naming `model_path` or that file."""
        if asked not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {asked!r}")
        record = record or {}
        chosen = record.get("precision", "float32")
        # the views on demand were guarded for the precision training chose, and are served with it alone
        margin = (record.get("views_on_demand") or {}).get("margin") if asked == "auto" else None
        if asked == "float32" or asked == "auto" and chosen != "int8":
            return cls("float32", margin, asked)
        path, available = int8 or (None, False)
        if not available:
            if chosen == "int8":
                raise UserError(f"{path}: not found; use the files of one training run")
            why = record.get("reason", "it was trained before cxr had int8")
            raise UserError(f"{model_path}: no int8 conversion beside it (training served it in float32: {why}); "
                            "use --precision float32 or auto")
        return cls("int8", margin, asked)

    def describe(self, views):
        """The plan in words, for a model of `views` test-time views."""
        detail = ("" if views < 2 else "; every view for every image" if self.margin is None else
                  f"; the views beyond the image as it is only where its answer is further than {self.margin:g} "
                  "from certain")
        return f"LiteRT {self.precision} on CPU where LiteRT runs (Keras elsewhere){detail}"


def choose(model, dataset, requested, seed, fit_point=None, calibration=None):
    """Choose how `model` (an in-memory `SavedModel` served in float32 with every view) is served, once, at the end
    of training, and serve it so from now on: int8 where it passes its guard on the validation split of `dataset`
    (or `requested` is "int8"), else float32; at that precision, the views beyond the first on demand where
    `requested` is "auto", the model has several views and they pass their own guard. Returns the record saved as
    the metadata's "inference". `fit_point` and `calibration`: as `precision.guard_int8` takes them."""
    from cxr.bundle import precision, views_on_demand

    record, int8, outputs = precision.guard_int8(model, dataset, requested, seed, fit_point, calibration)
    on_demand = None
    # outputs: None where int8 was not guarded (float32 asked for, no LiteRT, too few validation images)
    if requested == "auto" and len(model.test_time_scales) > 1 and outputs is not None:
        served = record["precision"]
        if served == "int8":
            int8_views = views_on_demand.int8_predictor(int8, model.task, views_on_demand.EVERY_VIEW)
            views = (int8_views.first, int8_views.others, int8_views)
        else:
            views = (*model.view_predictors(), model.predictor())
        record["views_on_demand"], on_demand = views_on_demand.choose(model.task, views, dataset, outputs[served])
    model.serve(record, int8=int8, predictor=on_demand)
    return record
