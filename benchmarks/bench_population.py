"""The population check (`cxr.model.population`) against the images it must catch and those it must not flag.

    .venv/bin/python benchmarks/bench_population.py --run outputs            # a cxr train output folder

For the trained model in RUN/models (with the population.npz its training fitted) and its RUN/reports/splits.csv,
on the same machine in one run:
- must not flag: the run's own test split, and ../shared/data/chest_xray/external_dev (another period);
- must flag: the NIH ChestX-ray14 adults (../shared/data/nih_chestxray14_sample), the adult DICOM, images that are
  not chest X-rays (photographs and drawings scikit-image ships, charts, a text page and shapes drawn with
  matplotlib and scikit-image), and 200 of the test split's X-rays inverted, rotated 90 degrees and cropped to
  their central 40 %. No lateral view is available offline here, so laterals are not measured.
For each candidate score (the saved check, Mahalanobis distances at 4 depths; "Mahalanobis last", on the last
feature map alone; "kNN last", cosine k=10 nearest neighbours there; the maximum softmax probability and the
energy score as baselines), each thresholded on the validation split at
the saved check's false-flag rate: the share flagged per set and the AUROC of each set against the two
must-not-flag sets together. Then the time the check adds per image.

    .venv/bin/python benchmarks/bench_population.py --sizes 100 300 1000 [--seeds 0 1] [--run outputs]

instead trains cxr's default recipe on that many images drawn from the Kermany train folder and from the NIH
sample (each seed its own draw and training seed) and gives, per model, the share of its own test split flagged
and of the other population (adults for the pediatric model, Kermany's external_dev children for the adult one),
of the not-X-rays and of the edited X-rays; or the reason the model has no check. `--run` adds a full-size run.
"""

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EDITED = 200  # test X-rays inverted, rotated and cropped


def split_paths(splits_csv, split):
    with open(splits_csv) as f:
        return [Path(row["path"]) for row in csv.DictReader(f) if row["split"] == split]


def not_xrays(size):
    """(n, size, size, 3) uint8 images that are not chest X-rays: photographs, drawings, charts, text, shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from skimage import data, draw

    from cxr.evaluate.plots import figure_png

    shipped = ["astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "horse",
               "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text",
               "brick", "grass", "gravel", "checkerboard", "binary_blobs"]
    pictures = []
    for name in shipped:
        try:
            pictures.append(np.asarray(getattr(data, name)()))
        except Exception:  # a picture this scikit-image must download: left out
            continue
    rng = np.random.default_rng(0)
    for k in range(8):  # charts and a text page, as a screenshot would bring them
        fig, ax = plt.subplots(figsize=(4, 4))
        if k % 4 == 0:
            ax.plot(np.cumsum(rng.normal(size=200)))
        elif k % 4 == 1:
            ax.bar(range(8), rng.random(8))
        elif k % 4 == 2:
            ax.imshow(rng.random((16, 16)), cmap="viridis")
        else:
            ax.axis("off")
            ax.text(0, 1, "\n".join("Lorem ipsum dolor sit amet, consectetur" for _ in range(18)), va="top", fontsize=7)
        pictures.append(np.asarray(Image.open(io.BytesIO(figure_png(fig))).convert("RGB")))
        plt.close(fig)
    for k in range(8):
        shapes, _ = draw.random_shapes((256, 256), max_shapes=8, rng=k, channel_axis=-1)
        pictures.append(shapes)
    out = []
    for picture in pictures:
        image = Image.fromarray(picture.astype(np.uint8) if picture.dtype != bool else picture.astype(np.uint8) * 255)
        out.append(np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def edited(images):
    """{name: images} of the X-rays `images` inverted, rotated 90 degrees and cropped to their central 40 %."""
    from PIL import Image

    side = images.shape[1]
    inner = int(side * 0.4)
    start = (side - inner) // 2
    crop = [np.asarray(Image.fromarray(x[start:start + inner, start:start + inner]).resize((side, side),
                                                                                          Image.BILINEAR))
            for x in images]
    return {"inverted": 255 - images, "rotated 90": np.rot90(images, 1, axes=(1, 2)).copy(), "crop 40 %": np.stack(crop)}


def decoded(paths, size):
    from cxr.data.decode import decode_image

    return np.stack([decode_image(p, size) for p in paths])


class Candidates:
    """The scores compared, each fitted on training features and thresholded on validation at `rate`."""

    def __init__(self, model, train, val, rate):
        from sklearn.covariance import LedoitWolf

        self.model, self.rate = model, rate
        last = slice(sum(model.population.dims[:-1]), None)
        self.last = last
        gaussian = LedoitWolf().fit(train[1][:, last].astype(np.float64))
        self.mean, self.precision = gaussian.location_, gaussian.precision_
        self.reference = self._normalised(train[1][:, last])
        self.head = model.keras_model.get_layer("predictions").get_weights()
        self.thresholds = {name: np.quantile(score(val), 1 - rate) for name, score in self.scores().items()}

    @staticmethod
    def _normalised(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def scores(self):
        """{name: (raw, features) -> (n,) score, higher = less alike}"""
        def saved(outputs):
            return self.model.population.scores(outputs[1])

        def mahalanobis_last(outputs):
            centred = outputs[1][:, self.last] - self.mean
            return np.sqrt(np.maximum(((centred @ self.precision) * centred).sum(axis=1), 0))

        def knn(outputs, k=10):
            similarity = self._normalised(outputs[1][:, self.last]) @ self.reference.T
            return -np.sort(similarity, axis=1)[:, -k]

        def max_probability(outputs):
            return -outputs[0].max(axis=1)

        def energy(outputs):  # of the head's logits on the image as it is (the view the taps read)
            weights, bias = self.head
            logits = outputs[1][:, self.last] @ weights + bias
            top = logits.max(axis=1)
            return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))

        return {"saved check": saved, "Mahalanobis last": mahalanobis_last, "kNN last": knn,
                "max softmax": max_probability, "energy": energy}


def subset_run(dataset, size, seed, folder, extra=()):
    """Train cxr's default recipe on `size` images of `dataset` ("kermany": the train folder's classes; "nih":
    rows of the NIH labels CSV), drawn with `seed`; returns the run's output folder."""
    import shutil
    import subprocess

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    if dataset == "kermany":
        files = sorted((SHARED / "chest_xray" / "train").rglob("*.jpeg"))
        for path in [files[k] for k in np.sort(rng.choice(len(files), size, replace=False))]:
            (folder / "data" / path.parent.name).mkdir(parents=True, exist_ok=True)
            (folder / "data" / path.parent.name / path.name).symlink_to(path)
        source = ["--data-dir", str(folder / "data")]
    else:
        lines = (SHARED / "nih_chestxray14_sample" / "Data_Entry_2017.csv").read_text().splitlines()
        picked = np.sort(rng.choice(len(lines) - 1, size, replace=False)) + 1
        (folder / "labels.csv").write_text("\n".join([lines[0], *(lines[k] for k in picked)]) + "\n")
        source = ["--labels", str(folder / "labels.csv"), "--images", str(SHARED / "nih_chestxray14_sample" / "images")]
    done = subprocess.run([sys.executable, "-m", "cxr", "train", *source, "--output-dir", str(folder / "outputs"),
                           "--seed", str(seed), "--bootstrap", "200", "--quiet", *extra], capture_output=True, text=True,
                          env=os.environ | {"XDG_CACHE_HOME": str(folder / "cache")})
    if done.returncode:
        sys.exit(f"cxr train on {size} {dataset} images failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(folder / "cache", ignore_errors=True)
    return folder / "outputs"


def flagged_shares(run, other):
    """(images in the train/val splits, {set: (share flagged, images)}) of the saved check of the run in `run`,
    or (..., the reason it has none); `other`: the other population's image paths."""
    from cxr.bundle.saved_model import SavedModel

    model = SavedModel.load(run / "models" / "model.h5")
    splits = run / "reports" / "splits.csv"
    counts = {s: len(split_paths(splits, s)) for s in ("train", "val", "test")}
    if model.population is None:
        return counts, model.population_note
    size = model.img_size
    rng = np.random.default_rng(0)
    test = decoded(split_paths(splits, "test"), size)
    sets = {"own test split": test, "other population": decoded(other, size), "not chest X-rays": not_xrays(size),
            **edited(test[np.sort(rng.choice(len(test), min(EDITED, len(test)), replace=False))])}
    shares = {}
    for name, images in sets.items():
        check = model.check_population(model.raw_outputs(images)[1])
        shares[name] = (check.flagged / len(images), len(images))
    return counts, shares


def sizes_main(args):
    """The check at each training size, both directions: a pediatric model (Kermany) against adults (NIH), an
    adult model (NIH) against children (Kermany's external_dev)."""
    import tempfile

    adults = sorted((SHARED / "nih_chestxray14_sample" / "images").iterdir())
    children = sorted(p for p in (SHARED / "chest_xray" / "external_dev").rglob("*") if p.is_file())
    print("| model | images drawn | seed | train / val / test | own test flagged | other population flagged | "
          "not X-rays flagged | inverted / rotated / cropped flagged |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = [(d, size, seed, None) for d in args.datasets for size in args.sizes for seed in args.seeds
            if d == "kermany" or size <= 414]
    runs += [("kermany", "full", "-", Path(run)) for run in args.runs or ()]
    with tempfile.TemporaryDirectory(prefix="bench-population-") as scratch:
        for dataset, size, seed, run in runs:
            run = run or subset_run(dataset, size, seed, Path(scratch) / f"{dataset}-{size}-{seed}",
                                    ["--population-check", "always"] if args.always else [])
            counts, shares = flagged_shares(run, adults if dataset == "kermany" else children)
            split = f"{counts['train']} / {counts['val']} / {counts['test']}"
            name = "pediatric (Kermany)" if dataset == "kermany" else "adult (NIH)"
            if isinstance(shares, str):
                print(f"| {name} | {size} | {seed} | {split} | no check, and every answer says why ("
                      f"{shares.split(': ', 1)[1].split(' (')[0]}) | | | |", flush=True)
                continue
            cell = {k: f"{100 * v:.1f} % of {n}" for k, (v, n) in shares.items()}
            print(f"| {name} | {size} | {seed} | {split} | {cell['own test split']} | {cell['other population']} | "
                  f"{cell['not chest X-rays']} | {100 * shares['inverted'][0]:.0f} / {100 * shares['rotated 90'][0]:.0f}"
                  f" / {100 * shares['crop 40 %'][0]:.0f} % |", flush=True)
    print("(NIH has 414 images here: its larger sizes can't be drawn)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a cxr train output folder")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="instead: train the default recipe on this many images of each --datasets, per "
                             "--seeds, and measure each model's check (with --run: that run too, as the full size)")
    parser.add_argument("--datasets", nargs="+", default=["kermany", "nih"], choices=["kermany", "nih"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--always", action="store_true",
                        help="with --sizes: fit the check whatever the validation split's size, to see what it would "
                             "do (cxr train --population-check always)")
    parser.add_argument("--false-flag-rate", type=float, nargs="+", default=None,
                        help="threshold every score (the saved check too) at these shares of validation images "
                             "(default: the saved check's rate and threshold)")
    args = parser.parse_args()
    if args.sizes:
        args.runs = [args.run] if args.run else []
        return sizes_main(args)
    if args.run is None:
        parser.error("give --run or --sizes")
    from sklearn.metrics import roc_auc_score

    from cxr.bundle.saved_model import SavedModel

    model = SavedModel.load(args.run / "models" / "model.h5")
    if model.population is None:
        sys.exit(f"{args.run}/models has no population.npz: train it with this cxr")
    size = model.img_size
    splits = args.run / "reports" / "splits.csv"
    rng = np.random.default_rng(0)
    train_paths = split_paths(splits, "train")
    train_paths = [train_paths[k] for k in np.sort(rng.choice(len(train_paths), min(1000, len(train_paths)), replace=False))]
    test_images = decoded(split_paths(splits, "test"), size)
    external = sorted(p for p in (SHARED / "chest_xray" / "external_dev").rglob("*") if p.is_file())
    sets = {"test split": test_images, "external_dev": decoded(external, size),
            "NIH adults": decoded(sorted((SHARED / "nih_chestxray14_sample" / "images").iterdir()), size),
            "adult DICOM": decoded([SHARED / "dicom" / "nih-chestxray14-dx.dcm"], size),
            "not chest X-rays": not_xrays(size),
            **edited(test_images[np.sort(rng.choice(len(test_images), min(EDITED, len(test_images)), replace=False))])}
    model.predictor(n_images=10_000)
    print(f"model {args.run}/models/model.h5 ({model.backbone}, {size} px, engine {model.engine}); check fitted on "
          f"{model.population.counts}, false-flag rate {model.population.false_flag_rate}")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    print("CPU flags:", " ".join(sorted(f for f in flags if f.startswith(("avx", "amx")))))
    outputs = {name: model.raw_outputs(images) for name, images in sets.items()}
    train = model.raw_outputs(decoded(train_paths, size))
    val = model.raw_outputs(decoded(split_paths(splits, "val"), size))
    for rate in args.false_flag_rate or [None]:
        candidates = Candidates(model, train, val, rate or model.population.false_flag_rate)
        saved = f"{model.population.threshold:.3f}, as saved" if rate is None else (
            f"{candidates.thresholds['saved check']:.3f}, refitted")
        print(f"\nshare flagged at each score's threshold (validation's {100 * candidates.rate:g} % highest; the saved "
              f"check's {saved}); AUROC against test split + external_dev")
        print(f"{'set':18} {'images':>6}  " + "  ".join(f"{n:>22}" for n in candidates.scores()))
        for name in sets:
            cells = []
            for score_name, score in candidates.scores().items():
                values = score(outputs[name])
                threshold = (model.population.threshold if score_name == "saved check" and rate is None
                             else candidates.thresholds[score_name])
                cell = f"{100 * np.mean(values > threshold):5.1f} %"
                if name not in ("test split", "external_dev"):
                    inside = np.concatenate([score(outputs[s]) for s in ("test split", "external_dev")])
                    auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(values))], np.r_[inside, values])
                    cell += f" AUROC {auroc:.3f}"
                cells.append(f"{cell:>22}")
            print(f"{name:18} {len(sets[name]):6}  " + "  ".join(cells))

    images = sets["test split"][:256]
    plain = model.keras_model
    from cxr.bundle import litert

    plain_runner = litert.LiteRTModel(litert.to_flatbuffer(plain))
    for runner in (plain_runner, model.predictor()):
        runner.predict_on_batch(images[:8].astype(np.float32))
    timings = {}
    for label, runner in (("forward pass, outputs only", plain_runner), ("forward pass with the taps", model.predictor())):
        start = time.perf_counter()
        for s in range(0, len(images), 32):
            runner.predict_on_batch(images[s:s + 32].astype(np.float32))
        timings[label] = (time.perf_counter() - start) / len(images)
    features = model.raw_outputs(images)[1]
    start = time.perf_counter()
    for _ in range(10):
        model.population.check(features)
    timings["scoring the check"] = (time.perf_counter() - start) / 10 / len(images)
    print(f"\ntime per image on {len(images)} test images (LiteRT, batches of 32):")
    for label, seconds in timings.items():
        print(f"  {label:28} {1000 * seconds:7.3f} ms")
    added = timings["forward pass with the taps"] - timings["forward pass, outputs only"] + timings["scoring the check"]
    print(f"  the check adds {1000 * added:.3f} ms per image, "
          f"{100 * added / timings['forward pass, outputs only']:.1f} % of the forward pass")


if __name__ == "__main__":
    main()
