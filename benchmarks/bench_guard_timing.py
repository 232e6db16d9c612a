"""How steady the guards' speed condition is: the views on demand against every view, timed as the guard times them.

    .venv/bin/python benchmarks/bench_guard_timing.py --run outputs --margin 0.001 --repeats 3

For the two-view model in RUN/models and 128 of its validation images (RUN/reports/splits.csv, spread evenly), each
repetition times the model with every view and the views on demand at MARGIN twice: once each, one after the other
(the guards before 8eafa01), and as `cxr.bundle.fidelity.speeds` times them now (the best of 3 rounds, the two in
turn). The ratio decides the guard at MIN_SPEEDUP (1.05).
"""

import argparse
import csv
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("outputs"))
    parser.add_argument("--margin", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from cxr.bundle.fidelity import speeds
    from cxr.bundle.saved_model import SavedModel
    from cxr.bundle.views_on_demand import MIN_SPEEDUP, ViewsOnDemand
    from cxr.data.decode import decode_image
    from cxr.model.inference import predict_outputs

    model = SavedModel.load(args.run / "models" / "model.h5", "float32")
    with open(args.run / "reports" / "splits.csv") as f:
        val = [r["path"] for r in csv.DictReader(f) if r["split"] == "val"]
    x = np.stack([decode_image(val[k], model.img_size) for k in np.linspace(0, len(val) - 1, 128).astype(int)])
    every = model.predictor()
    first, others = model.view_predictors()
    on_demand = ViewsOnDemand(first, others, model.task, args.margin)
    need = model.task.uncertain(predict_outputs(first, x)[:, :len(model.class_names)], args.margin)
    print(f"{args.run}: {len(x)} validation images, margin {args.margin:g}, {need.mean():.0%} need every view")
    print("| repetition | one timing each: every view, on demand (images/s), ratio | best of 3 in turn: every view, "
          f"on demand, ratio | passes {MIN_SPEEDUP}x (one / best of 3) |")
    print("| --- | --- | --- | --- |")
    for repetition in range(args.repeats):
        single = [speeds({"timed": predictor}, x, rounds=1)["timed"] for predictor in (every, on_demand)]
        best = speeds({"every": every, "on_demand": on_demand}, x)
        ratios = single[1] / single[0], best["on_demand"] / best["every"]
        print(f"| {repetition + 1} | {single[0]:.1f}, {single[1]:.1f}, {ratios[0]:.2f}x | {best['every']:.1f}, "
              f"{best['on_demand']:.1f}, {ratios[1]:.2f}x | {'yes' if ratios[0] >= MIN_SPEEDUP else 'no'} / "
              f"{'yes' if ratios[1] >= MIN_SPEEDUP else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
