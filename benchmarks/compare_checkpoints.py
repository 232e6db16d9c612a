"""Validation and test AUC of saved models on the split a training run used, rebuilt from its data and seed.

    .venv/bin/python benchmarks/compare_checkpoints.py --data-dir ../shared/data/chest_xray \\
        --cache-dir /tmp/full2/out/cache  run_a/models/best_feature_extractor.keras run_b/models/model.h5

A run carves its validation and test sets in memory (when val/ is tiny or test/ is missing), so the only way
to score another checkpoint on the same images is to rebuild the split with the same options; this does that
with cxr's defaults (70/15/15, `--seed`) and scores each model at argmax, uncalibrated: the numbers compare
checkpoints with each other, not with a run's report, which applies its operating point.
"""

import argparse
import os
import tempfile
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--cache-dir", type=Path, help="a run's outputs/cache, to skip decoding (default: temporary)")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sklearn.metrics import balanced_accuracy_score

    import keras

    from cxr.training.config import Config
    from cxr.data.split import prepare_splits
    from cxr.evaluate.metrics import auc_score
    from cxr.model.inference import predict_outputs
    from cxr.bundle.litert import fast_inference

    dataset = prepare_splits(Config(data_dir=args.data_dir, seed=args.seed, img_size=args.img_size))
    with tempfile.TemporaryDirectory() as tmp:
        dataset.decode(args.img_size, args.cache_dir or tmp)
        n = len(dataset.class_names)
        print(f"{'model':70} {'val AUC':>8} {'test AUC':>8} {'test acc':>8} {'test bal.acc':>12}")
        for path in args.models:  # checkpoints have no class_names.json beside them: plain Keras files
            predictor, _ = fast_inference(keras.models.load_model(path, compile=False))
            scores = {}
            for split in ("val", "test"):
                rows, y = dataset.split(split)
                p = predict_outputs(predictor, dataset.images, rows)
                scores[split] = (auc_score(y, p, n), (p.argmax(1) == y).mean(), balanced_accuracy_score(y, p.argmax(1)))
            print(f"{str(path)[-70:]:70} {scores['val'][0]:8.4f} {scores['test'][0]:8.4f} {scores['test'][1]:8.4f} "
                  f"{scores['test'][2]:12.4f}")
        print(f"val {len(dataset.splits['val'])} images, test {len(dataset.splits['test'])} images, seed {args.seed}")


if __name__ == "__main__":
    main()
