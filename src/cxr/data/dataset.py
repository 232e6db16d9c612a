"""A dataset: source paths, a labels matrix, per-image metadata, named splits as row selections, and the images.

The contract is TorchXRayVision's: `labels` is an (N, classes) matrix, 1 where an image shows the class, 0
where it does not and NaN where unknown, beside a metadata table with one entry per image. A single-label
dataset (one class folder per image) has exactly one 1 per row and `targets` gives its column; a multi-label
one (several findings per image, some unlabelled) fits the same object.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.data.decode import describe_skipped
from cxr.data.pipeline import decode_all
from cxr.errors import UserError, warn


@dataclass
class Dataset:
    class_names: list  # column order of `labels`, and the model's output order
    paths: list  # (N,) source files, sorted
    labels: np.ndarray  # (N, classes) float32: 1, 0 or NaN (unknown)
    metadata: dict = field(default_factory=dict)  # column -> (N,) list: "patient" (key or None), ...
    splits: dict = field(default_factory=dict)  # split name -> (n,) int64 rows, in listing order
    images: object = None  # (N, size, size, 3) uint8 DiskArray once `decode` has run; unreadable rows are zeros
    multi_label: bool = False  # findings that co-occur (sigmoid outputs) rather than exclusive classes (softmax)

    @classmethod
    def from_files(cls, class_names, files, metadata=None):
        """A single-label dataset from {split: [(path, class index), ...]}; `metadata`: {column: {path: value}}."""
        paths = sorted({Path(p) for listed in files.values() for p, _ in listed})
        row = {p: i for i, p in enumerate(paths)}
        labels = np.zeros((len(paths), len(class_names)), np.float32)
        splits = {}
        for split, listed in files.items():
            rows = np.array([row[Path(p)] for p, _ in listed], dtype=np.int64)
            labels[rows, [y for _, y in listed]] = 1.0
            splits[split] = rows
        table = {column: [values.get(p) for p in paths] for column, values in (metadata or {}).items()}
        return cls(list(class_names), paths, labels, table, splits)

    @property
    def targets(self):
        """(N,) int64 class index per image: the column of its 1 (single-label datasets)."""
        return np.nan_to_num(self.labels, nan=-1.0).argmax(axis=1)

    def split(self, name):
        """(rows, y) of split `name`: (n,) int64 indices into `images`, and their labels: (n,) class indices for
        a single-label dataset, the (n, findings) rows of `labels` (1 / 0 / NaN) for a multi-label one."""
        rows = self.splits[name]
        return rows, self.labels[rows] if self.multi_label else self.targets[rows]

    def patients(self, rows):
        """(n,) patient key of `rows` (the row itself where none is known): what a bootstrap resamples."""
        keys = self.metadata.get("patient") or [None] * len(self.paths)
        return np.array([keys[r] if keys[r] is not None else f"row-{r}" for r in rows], dtype=object)

    def files(self, name):
        return [self.paths[r] for r in self.splits[name]]

    def names(self, rows):
        """File names of `rows` (for figure captions)."""
        return [self.paths[r].name for r in rows]

    def counts(self):
        """{split: {class: images}}; for a multi-label dataset {split: {finding: positive images}} plus "images"."""
        if self.multi_label:
            return {split: {"images": int(len(rows))} | {name: int(np.nansum(self.labels[rows, i]))
                                                         for i, name in enumerate(self.class_names)}
                    for split, rows in self.splits.items()}
        return {split: {name: int((self.targets[rows] == i).sum()) for i, name in enumerate(self.class_names)}
                for split, rows in self.splits.items()}

    def decode(self, size, cache_dir, strict=False):
        """Decode every image once (through the decode cache) and drop unreadable ones from the splits.

        With `strict`, unreadable images are refused instead. Returns the unreadable paths.
        """
        self.images, bad = decode_all(self.paths, size, cache_dir)
        if bad:
            if strict:
                raise UserError(f"unreadable or refused images: {describe_skipped(bad)}; remove or replace them, "
                                "or run without --strict")
            warn(f"skipped {len(bad)} unreadable or refused images: {describe_skipped(bad)}")
        unreadable = set(bad)
        readable = np.array([p not in unreadable for p in self.paths], dtype=bool)
        for name, rows in self.splits.items():
            self.splits[name] = rows[readable[rows]]
            if not len(self.splits[name]):
                raise UserError(f"the {name} split has no readable images; check the image files")
        return list(bad)
