"""Whether an X-ray is like the ones a model was trained on: the population check that every answer carries.

A model answers for any image with the same confidence, so each prediction also says whether the image lies
inside the population the model learned from. The check reads the image's pooled features at several depths of
the backbone (`backbones.Backbone.population_taps` and the last feature map, from the same forward pass as the
prediction: `networks.with_population_taps`) and measures, at each depth, the Mahalanobis distance to a Gaussian
fitted on training images with a Ledoit-Wolf covariance (Lee et al. 2018, "A simple unified framework for
detecting out-of-distribution samples"). Each depth's distance is standardised on the validation split and the
sum is the image's score; an image scoring above what `false_flag_rate` of validation images reach is flagged
(with fewer than 99 validation images no threshold keeps the share of a site's own images flagged under 3 %
with 95 % confidence, and the check is not fitted: `too_few_validation_images`).
Of the scores measured (one depth, several, k nearest neighbours, the top probability, the energy score) this
one separated other populations and non-X-rays best (bench_population.py in benchmarks/README.md).

The fitted check is `population.npz` beside the model file, and records the model file's SHA-256: a check
fitted for another model is refused. Scoring needs numpy only; fitting needs scikit-learn.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.atomic import atomic_path
from cxr.errors import UserError

POPULATION_FILE = "population.npz"
MAX_FALSE_FLAGS = 0.03  # the largest share of images like the validation ones the check may flag; above it, none
FLAG_CONFIDENCE = 0.95  # how surely a fitted check stays under MAX_FALSE_FLAGS
UNAVAILABLE = ("this model was saved without a population check (trained before cxr had one): its answers can't "
               "say whether an image is unlike its training images; train it again to get the check")


@dataclass
class PopulationCheck:
    """The check's answer for n images: `scores` (n,), `percentiles` (n,) (the share of validation images
    scoring at most as much, 0-100) and `in_distribution` (n,) bool (score <= threshold)."""
    scores: np.ndarray
    percentiles: np.ndarray
    in_distribution: np.ndarray
    threshold: float

    def record(self, k):
        """Image `k`'s answer as JSON-ready fields."""
        return {"in_distribution": bool(self.in_distribution[k]), "population_score": round(float(self.scores[k]), 3),
                "population_percentile": round(float(self.percentiles[k]), 1)}

    @property
    def flagged(self):
        return int(np.sum(~self.in_distribution))


@dataclass
class Population:
    """A fitted population check. Per depth k (`taps[k]`: the layer's name, `dims[k]`: its features): the training Gaussian's `means[k]`
    (d,) and `precisions[k]` (d, d), and the validation distances' `centres[k]` and `spreads[k]`. Then the
    sorted `validation_scores`, the flag `threshold`, the `false_flag_rate` it was set at, the images it was
    fitted on (`counts`: {"train": n, "val": n}) and the model file's `model_sha256`."""
    taps: list
    dims: list
    means: list
    precisions: list
    centres: np.ndarray
    spreads: np.ndarray
    validation_scores: np.ndarray
    threshold: float
    false_flag_rate: float
    counts: dict
    model_sha256: str = None

    def distances(self, features):
        """(n, depths) Mahalanobis distances of (n, sum(dims)) features, depth by depth."""
        features = np.asarray(features, dtype=np.float64)
        if features.shape[1] != sum(self.dims):
            raise UserError(f"the population check expects {sum(self.dims)} features per image, the model gives "
                            f"{features.shape[1]}: its {POPULATION_FILE} was fitted for another model")
        out, start = [], 0
        for mean, precision, d in zip(self.means, self.precisions, self.dims):
            centred = features[:, start:start + d] - mean
            out.append(np.sqrt(np.maximum(((centred @ precision) * centred).sum(axis=1), 0)))
            start += d
        return np.stack(out, axis=1)

    def scores(self, features):
        """(n,) the population score: the standardised distances summed over depths (higher: less alike)."""
        return ((self.distances(features) - self.centres) / self.spreads).sum(axis=1)

    def check(self, features):
        """A `PopulationCheck` of (n, sum(dims)) features."""
        scores = self.scores(features)
        percentiles = 100 * np.searchsorted(self.validation_scores, scores, side="right") / len(self.validation_scores)
        return PopulationCheck(scores, percentiles, scores <= self.threshold, self.threshold)

    def describe(self):
        """What the model card and the reports say about the check."""
        return {"method": "Mahalanobis distance to the training images' features at several depths (Ledoit-Wolf "
                          "covariance), standardised on validation and summed",
                "layers": self.taps, "threshold": round(float(self.threshold), 4),
                "false_flag_rate": self.false_flag_rate, "fitted_on": self.counts}

    def save(self, path, model_sha256):
        """Write the check to `path` (population.npz), recording the model file's hash."""
        self.model_sha256 = model_sha256
        arrays = {f"mean_{k}": m for k, m in enumerate(self.means)} | {f"precision_{k}": p for k, p in
                                                                         enumerate(self.precisions)}
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, taps=np.array(self.taps), dims=np.array(self.dims), centres=self.centres,
                         spreads=self.spreads, validation_scores=self.validation_scores,
                         threshold=self.threshold, false_flag_rate=self.false_flag_rate,
                         counts=np.array([self.counts["train"], self.counts["val"]]),
                         model_sha256=np.array(model_sha256), **arrays)

    @classmethod
    def load(cls, path, model_sha256):
        """The check at `path`; UserError when it is unreadable or was fitted for another model file."""
        fix = f"use the {POPULATION_FILE} that training wrote beside this model, or train again"
        try:
            with np.load(path, allow_pickle=False) as f:
                dims = [int(d) for d in f["dims"]]
                population = cls(
                    [str(t) for t in f["taps"]], dims, [f[f"mean_{k}"] for k in range(len(dims))],
                    [f[f"precision_{k}"] for k in range(len(dims))], f["centres"], f["spreads"],
                    f["validation_scores"], float(f["threshold"]), float(f["false_flag_rate"]),
                    dict(zip(("train", "val"), (int(n) for n in f["counts"]))), str(f["model_sha256"]))
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"{path}: not a readable population check ({str(error).splitlines()[0][:80]}); {fix}") from None
        if model_sha256 is not None and population.model_sha256 != model_sha256:
            raise UserError(f"{path}: this population check was fitted for another model file (its recorded hash "
                            f"differs from the model's); {fix}")
        return population


def too_few_validation_images(n_val):
    """Why `n_val` validation images can't set a threshold worth flagging with, or None when they can.

    The threshold is a validation score, so an image like the validation ones scores above the k-th smallest of n
    with probability at most 1 - k / (n + 1) on average over validation samples (split conformal prediction): the
    highest of n holds 1 / (n + 1) at best. One model has one validation sample, though, and the share of its
    site's images above its highest score is Beta(1, n) distributed: above MAX_FALSE_FLAGS with probability
    (1 - MAX_FALSE_FLAGS) ** n, more than 1 - FLAG_CONFIDENCE below 99 images (at 45 images, one model in four
    flags more than 3 % of its own images). Flagging that many teaches users to ignore the flag, so below that
    the check is not fitted, and says why."""
    needed = int(np.ceil(np.log(1 - FLAG_CONFIDENCE) / np.log(1 - MAX_FALSE_FLAGS)))
    if n_val >= needed:
        return None
    return (f"the population check is unavailable for this model: its validation split had {n_val} images, and at "
            f"least {needed} are needed to keep it from flagging more than {MAX_FALSE_FLAGS:.0%} of images like "
            "its own (train on more images to get it); its answers can't say whether an image is unlike its "
            "training images")


def threshold_at(sorted_scores, false_flag_rate):
    """(threshold, the false-flag rate it holds): the ceil((n + 1)(1 - rate))-th smallest of n validation scores,
    or the highest where n is too small for `false_flag_rate` (then 1 / (n + 1))."""
    n = len(sorted_scores)
    k = min(int(np.ceil((n + 1) * (1 - false_flag_rate))), n)
    return float(sorted_scores[k - 1]), max(false_flag_rate, 1 - k / (n + 1))


def fit(train_features, val_features, taps, dims, false_flag_rate):
    """The population check of training images' (n, sum(dims)) features (the layers `taps`, `dims` features
    each), standardised and thresholded on validation images' features so that at most `false_flag_rate` of images
    like them are flagged (or 1 / (n_val + 1), where there are too few to hold that rate: `threshold_at`)."""
    from sklearn.covariance import LedoitWolf

    means, precisions, start = [], [], 0
    for d in dims:
        gaussian = LedoitWolf().fit(np.asarray(train_features[:, start:start + d], dtype=np.float64))
        means.append(gaussian.location_.astype(np.float32))
        precisions.append(gaussian.precision_.astype(np.float32))
        start += d
    population = Population(list(taps), list(dims), means, precisions, np.zeros(len(dims)), np.ones(len(dims)),
                            np.zeros(1), 0.0, false_flag_rate, {"train": len(train_features), "val": len(val_features)})
    distances = population.distances(val_features)
    population.centres, population.spreads = distances.mean(axis=0), np.maximum(distances.std(axis=0), 1e-9)
    population.validation_scores = np.sort(population.scores(val_features))
    population.threshold, population.false_flag_rate = threshold_at(population.validation_scores, false_flag_rate)
    return population
