"""Site calibration measured: `cxr calibrate` on one half of external_dev, evaluated on the other half.

    .venv/bin/python benchmarks/bench_site_calibration.py /tmp/cxr-generalization/default-42/models/model.h5

external_dev (the stand-in for another hospital) is split into two patient-disjoint halves, stratified by
class, with cxr's own splitter. For each direction (calibrate on A, evaluate on B; then B on A) it prints the
held-out half's sensitivity, specificity and balanced accuracy (95% bootstrap CIs) at the model's own
operating point and at the one `cxr calibrate` fitted on the other half (with the model's own threshold rule,
or --target-sensitivity youden|X). The model file is never changed.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = ROOT.parent / "shared" / "data" / "chest_xray" / "external_dev"


def halves(source, target, seed):
    """Copy `source`/<Class>/ into `target`/{A,B}/<Class>/, patient-disjoint, half of each class in each."""
    from cxr.data.split import assign_splits, labelled, list_class_folders, list_images

    class_names = list_class_folders(source)
    files = labelled(class_names, list_images(source, class_names))
    paths, labels = [p for p, _ in files], [y for _, y in files]
    assigned = assign_splits(paths, labels, {"B": 0.5}, seed)
    for half, indices in (("A", assigned["train"]), ("B", assigned["B"])):
        for i in indices:
            (target / half / class_names[labels[i]]).mkdir(parents=True, exist_ok=True)
            shutil.copy2(paths[i], target / half / class_names[labels[i]] / paths[i].name)
    return target / "A", target / "B"


def line(name, summary):
    m, ci = summary["metrics"], summary["confidence_intervals"]

    def show(metric):
        low, high = ci.get(metric, [None, None])
        return f"{m[metric]:.3f} ({low:.3f}-{high:.3f})" if low is not None else f"{m[metric]:.3f}"

    point = summary["operating_point"]
    return (f"{name:34} threshold {point['threshold']:.3f}  T {point['temperature']:.2f}  sensitivity "
            f"{show('sensitivity')}  specificity {show('specificity')}  balanced accuracy {show('balanced_accuracy')}")


def main():
    from cxr.cli import sensitivity_or_youden

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="of the split into halves")
    parser.add_argument("--target-sensitivity", default="model",
                        type=lambda text: text if text == "model" else sensitivity_or_youden(text),
                        help="the rule calibrate refits the threshold with: model (the one it was trained with), "
                             "youden, or a sensitivity such as 0.9")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cxr.commands.calibrate import calibrate
    from cxr.commands.evaluate import evaluate
    from cxr.evaluate import EvaluationOptions

    options = EvaluationOptions(bootstrap=2000, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a, b = halves(EXTERNAL, tmp / "halves", args.seed)
        for fit, held_out in ((a, b), (b, a)):
            counts = {c.name: len(list(c.iterdir())) for c in sorted(fit.iterdir())}
            print(f"calibrate on {fit.name} {counts}, evaluate on {held_out.name}:")
            calibrate(args.model, fit, tmp / f"cal-{fit.name}", options, args.target_sensitivity)
            for name, model in (("model's own operating point", args.model),
                                ("calibrated on the other half", tmp / f"cal-{fit.name}" / "models" / "model.h5")):
                summary = evaluate(model, tmp / f"eval-{fit.name}-{model.parent.parent.name}", options, held_out)
                print("  " + line(name, summary))


if __name__ == "__main__":
    main()
