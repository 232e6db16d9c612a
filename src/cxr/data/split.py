"""Find the images and decide which split each one belongs to.

Two layouts are accepted under the data folder:

- ``train/<Class>/`` (with ``val/`` and ``test/`` if present): used as they are; a missing ``test/`` or a
  ``val/`` with fewer than ``MIN_VAL_IMAGES`` images is carved out of ``train/`` instead;
- ``raw/<Class>/`` only: copied (never moved) into ``train/``, ``val/`` and ``test/``;
- ``<Class>/`` folders directly in it (as ``cxr evaluate`` takes them): used as ``train/``, with validation and
  test carved out of it, nothing copied.

Splits are made by group, never by image: a group joins every image of one patient (read from the file name)
and every byte-identical copy of a file, so neither a patient nor a duplicate ends up in two splits.
"""

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from cxr.atomic import from_spreadsheet_safe, write_json
from cxr.data.dataset import Dataset
from cxr.data import dicom
from cxr.data.decode import IMAGE_KINDS, is_dicom_file, is_image_file
from cxr.errors import UserError, list_paths, warn

SPLITS = ("train", "val", "test")
MIN_VAL_IMAGES = 50
MANIFEST = "split.json"  # written by split_raw: the split is cxr's own, so its val/ is used as it is
SPLIT_STAGING = ".cxr-split-partial"  # split_raw's work folder, renamed into train/ val/ test/
# Patient ids in the Kermany chest X-ray file names: person1234_bacteria_1.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-0246-0001-0002.jpeg. The NORMAL2 series numbers its patients on its own, so it keeps its prefix.
DEFAULT_GROUP_PATTERN = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


def list_class_folders(folder):
    """Class folders of `folder`, sorted by name (the model's output order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; point --data-dir at a folder with train/<Class>/ or "
                        "raw/<Class>/ (one subfolder of images per class, e.g. data/raw/NORMAL/ and data/raw/PNEUMONIA/)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder}: no class folders inside; put each class's images in {folder}/<ClassName>/")
    clashes = [c for c in classes if [o.casefold() for o in classes].count(c.casefold()) > 1]
    if clashes:
        raise UserError(f"{folder}: class folders {', '.join(clashes)} differ only in case; merge them into one "
                        "folder per class")
    return classes


_SKIPPED_SPECIAL = set()  # non-regular files already warned about (folders are walked more than once)


def walk_files(folder):
    """Every regular file under `folder`, sorted: symlinked folders are followed (each real folder once, so a
    link loop ends), hidden files and folders (.ipynb_checkpoints/) are left out, and so are FIFOs, sockets and
    devices (reading a FIFO would wait forever), with a warning."""
    seen, found = set(), []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(root) / name
            if name.startswith("."):
                continue
            if path.is_file():
                found.append(path)
            elif path.exists() and path not in _SKIPPED_SPECIAL:  # a broken link is left out silently
                _SKIPPED_SPECIAL.add(path)
                warn(f"{path}: not a regular file (a FIFO, socket or device); skipped")
    return sorted(found)


def list_images(folder, class_names, strict=False):
    """Return {class: [image paths]} for `folder`/<class>/, warning about (or, if strict, refusing) other files."""
    folder = Path(folder)
    images, others = {}, []
    for name in class_names:
        class_dir = folder / name
        files = walk_files(class_dir) if class_dir.is_dir() else []
        images[name] = [p for p in files if is_image_file(p)]
        others += [p for p in files if not is_image_file(p)]
    if others:
        message = f"not images (need {IMAGE_KINDS}), skipped: {list_paths(others)}"
        if strict:
            raise UserError(message + "; remove them or run without --strict")
        warn(message)
    return images


def check_classes(folder, images):
    empty = [name for name, files in images.items() if not files]
    if empty:
        raise UserError(f"{Path(folder) / empty[0]}: class folder has no images; add images or remove the folder")
    if len(images) < 2:
        raise UserError(f"{folder}: only one class ({next(iter(images))}); a classifier needs at least two class folders")


def group_key(pattern):
    """A function from file to patient key (None when neither the file nor its name carries a patient id).

    A DICOM file's PatientID (as a salted hash) takes precedence over the file-name pattern.
    """
    regex = re.compile(pattern or DEFAULT_GROUP_PATTERN)

    def key(path):
        if is_dicom_file(path):
            patient = dicom.patient_key(path)
            if patient is not None:
                return patient
        match = regex.search(Path(path).name)
        if not match:
            return None
        return match.group(1) if regex.groups else match.group(0)

    return key


def file_digests(paths):
    """Content hash per path, computed only for files that share their size with another file."""
    sizes = {p: os.path.getsize(p) for p in paths}
    size_counts = Counter(sizes.values())
    digests = {}
    for p in paths:
        if size_counts[sizes[p]] > 1:
            digests[p] = hashlib.sha1(Path(p).read_bytes()).hexdigest()
    return digests


def make_groups(paths, pattern=None):
    """Union-find over paths: two files share a group when they share a patient key or their bytes."""
    parent = list(range(len(paths)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen = {}
    key = group_key(pattern)
    digests = file_digests(paths)
    for i, p in enumerate(paths):
        for k in (("patient", key(p)), ("bytes", digests.get(p))):
            if k[1] is None:
                continue
            if k in first_seen:
                parent[find(i)] = find(first_seen[k])
            else:
                first_seen[k] = i
    groups = defaultdict(list)
    for i in range(len(paths)):
        groups[find(i)].append(i)
    return list(groups.values())


def assign_splits(paths, labels, fractions, seed, pattern=None):
    """Assign every image to a split named in `fractions` (e.g. {"val": .15, "test": .15}) or to "train".

    Groups are shuffled with `seed` within each class (a group counts for its most common label) and dealt to
    the held-out splits until each holds its fraction of the class. Returns {split: [indices into paths]}.
    """
    groups = make_groups(paths, pattern)
    by_class = defaultdict(list)
    for members in groups:
        label = Counter(labels[i] for i in members).most_common(1)[0][0]
        by_class[label].append(sorted(members))
    rng = np.random.default_rng(seed)
    assigned = {name: [] for name in ["train", *fractions]}
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        order = rng.permutation(len(class_groups))
        class_size = sum(len(g) for g in class_groups)
        targets = {name: round(frac * class_size) for name, frac in fractions.items()}
        filled = dict.fromkeys(fractions, 0)
        for g in order:
            members = class_groups[g]
            split = next((name for name in fractions if filled[name] < targets[name]), "train")
            if split != "train":
                filled[split] += len(members)
            assigned[split] += members
    return {name: sorted(idx) for name, idx in assigned.items()}


def count_images(folder, class_names):
    folder = Path(folder)
    return sum(1 for c in class_names if (folder / c).is_dir() for p in walk_files(folder / c) if is_image_file(p))


def split_raw(data_dir, config):
    """Copy data_dir/raw/<Class>/ into data_dir/{train,val,test}/<Class>/, by group, without touching raw/."""
    raw = Path(data_dir) / "raw"
    class_names = list_class_folders(raw)
    images = list_images(raw, class_names, strict=config.strict)
    check_classes(raw, images)
    paths = [p for name in class_names for p in images[name]]
    labels = [i for i, name in enumerate(class_names) for _ in images[name]]
    fractions = {"val": config.val_split, "test": config.test_split}
    assigned = assign_splits(paths, labels, fractions, config.seed, config.group_pattern)
    # Copy into a staging folder and rename it into place, so an interrupted copy never looks like a split.
    staging = Path(data_dir) / SPLIT_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError as error:
        raise UserError(f"{data_dir}: can't write the train/val/test split beside raw/ ({error.strerror}); copy the "
                        "data folder somewhere writable, or split it yourself into train/, val/ and test/") from None
    for split, indices in assigned.items():
        for name in class_names:
            (staging / split / name).mkdir(parents=True, exist_ok=True)
        for i in indices:
            relative = paths[i].relative_to(raw / class_names[labels[i]])
            target = staging / split / class_names[labels[i]] / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(paths[i], target)
    for split in SPLITS:
        os.replace(staging / split, Path(data_dir) / split)
    write_json(Path(data_dir) / MANIFEST, {
        "source": "raw", "seed": config.seed, "val_split": config.val_split, "test_split": config.test_split,
        "group_pattern": config.group_pattern or DEFAULT_GROUP_PATTERN,
        "files": {split: sorted(str(paths[i].relative_to(raw)) for i in idx) for split, idx in assigned.items()},
    })
    staging.rmdir()  # last: other processes waiting for the split (wait_for_split) take this as its end
    print(f"Split {raw} into train/val/test under {data_dir} (seed {config.seed}, by patient and duplicate)")


def wait_for_split(data_dir, timeout):
    """Return once `data_dir` holds a complete split of raw/, made by another process (a multi-worker job's
    chief), waiting up to `timeout` seconds: split_raw's staging folder is gone and train/ has images."""
    data_dir = Path(data_dir)

    def complete():
        train = data_dir / "train"
        return (not (data_dir / SPLIT_STAGING).exists() and train.is_dir()
                and any(is_image_file(p) for p in walk_files(train)))

    if complete():
        return
    print(f"Waiting for the chief worker to split {data_dir / 'raw'} into train/val/test", flush=True)
    deadline = time.monotonic() + timeout
    while not complete():
        if time.monotonic() > deadline:
            raise UserError(f"{data_dir}: the chief worker did not split raw/ within {timeout:.0f} s; in a multi-worker "
                            "job put the data folder on storage every worker reads, or give each machine the same "
                            "train/ (and val/, test/) folders")
        time.sleep(1)


def flat_class_folders(data_dir):
    """Whether `data_dir` holds class folders of images itself (no train/, val/, test/ or raw/)."""
    folders = [p for p in Path(data_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return (bool(folders) and not any(p.name in (*SPLITS, "raw") for p in folders)
            and any(is_image_file(f) for p in folders for f in walk_files(p)))


def say_split_reused(data_dir, seed):
    """One line when train/val/test are a split of raw/ that cxr made earlier, which is used as it is."""
    try:
        made = json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return
    line = (f"Using the split of {Path(data_dir) / 'raw'} made earlier (seed {made.get('seed')}, "
            f"{Path(data_dir) / MANIFEST}); delete train/, val/ and test/ to split again")
    if made.get("seed") not in (None, seed):
        warn(f"{line}: --seed {seed} does not change it")
    else:
        print(line, flush=True)


def prepare_splits(config, split_wait=None):
    """The data folder as a Dataset with train/val/test splits (not yet decoded), splitting or carving as the
    layout needs.

    `split_wait`: None to split raw/ here when it must be split, or the seconds to wait for another process
    to do it (the other workers of a multi-worker job, which never write into the data folder).
    """
    data_dir = Path(config.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder; point --data-dir at a folder with train/<Class>/ or "
                        "raw/<Class>/ (one subfolder of images per class, e.g. data/raw/NORMAL/ and data/raw/PNEUMONIA/)")
    if split_wait is not None and (data_dir / "raw").is_dir():
        wait_for_split(data_dir, split_wait)
    train_dir = data_dir / "train"
    has_train = train_dir.is_dir() and any(is_image_file(p) for p in walk_files(train_dir))
    flat = False
    if not has_train:
        if (data_dir / "raw").is_dir():
            split_raw(data_dir, config)
        elif flat_class_folders(data_dir):
            train_dir, flat = data_dir, True
            print(f"Using the class folders of {data_dir} as the training data, with validation and test carved out "
                  "of them by patient (nothing is copied)", flush=True)
        else:
            raise UserError(f"{data_dir}: found neither train/<Class>/ nor raw/<Class>/ nor <Class>/ folders with "
                            "images; put your class folders in one of them")
    elif (data_dir / MANIFEST).is_file() and split_wait is None:
        say_split_reused(data_dir, config.seed)

    class_names = list_class_folders(train_dir)
    loose = [p for p in train_dir.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        warn(f"{train_dir}: {len(loose)} images lie outside the class folders and are not used "
             f"({list_paths(loose)}); move them into {train_dir}/<Class>/")
    train_images = list_images(train_dir, class_names, strict=config.strict)
    check_classes(train_dir, train_images)
    train_files = labelled(class_names, train_images)

    files, carve = {}, {}
    for split, fraction in (("val", config.val_split), ("test", config.test_split)):
        folder = data_dir / split
        n = count_images(folder, class_names) if folder.is_dir() and not flat else 0
        if flat:
            use_train = True
        elif split == "val":
            too_small = n < MIN_VAL_IMAGES and not (data_dir / MANIFEST).is_file()
            use_train = config.val_from_train if config.val_from_train is not None else too_small
            if too_small and use_train:
                warn(f"{folder} has {n} images, too few to early-stop on; carving validation from train "
                     f"({fraction:.0%} per class). Use --no-val-from-train to keep it.")
        else:
            use_train = n == 0
            if use_train:
                warn(f"{folder} has no images; carving the test set from train ({fraction:.0%} per class)")
        if use_train:
            carve[split] = fraction
        else:
            split_classes = list_class_folders(folder)
            if split_classes != class_names:
                raise UserError(f"{folder}: class folders {split_classes} differ from train's {class_names}; "
                                "give every split the same class folders")
            files[split] = labelled(class_names, list_images(folder, class_names, strict=config.strict))

    # Carved fractions are of the whole folder, as for a raw split.
    paths, labels = zip(*train_files)
    assigned = assign_splits(list(paths), list(labels), carve, config.seed, config.group_pattern)
    for split, indices in assigned.items():
        files[split] = [train_files[i] for i in indices]
    for split in SPLITS:
        if not files[split]:
            raise UserError(f"{data_dir}: the {split} split is empty; add images (each class needs a few per split)")
    patient = group_key(config.group_pattern)
    paths = [p for listed in files.values() for p, _ in listed]
    return Dataset.from_files(class_names, {split: files[split] for split in SPLITS},
                              metadata={"patient": {p: patient(p) for p in paths}, **dicom_metadata(paths)})


def dicom_metadata(paths):
    """{column: {path: value}} of the DICOM files' subgroup tags (sex, age, view, device); {} without DICOM."""
    tags = {p: dicom.subgroup_tags(p) for p in paths if is_dicom_file(p)}
    if not tags:
        return {}
    return {column: {p: values[column] for p, values in tags.items()} for column in dicom.SUBGROUP_TAGS}


def labelled(class_names, images):
    """[(path, class index)] in class order, from list_images' {class: [paths]}."""
    return [(p, i) for i, name in enumerate(class_names) for p in images[name]]


def read_labelled_folder(folder, class_names, split="evaluated"):
    """A Dataset of `folder`/<Class>/ images labelled with a model's `class_names`, as one split.

    Folders the model doesn't know are refused; classes without a folder get a warning.
    """
    found = list_class_folders(folder)
    unknown = [c for c in found if c not in class_names]
    if unknown:
        raise UserError(f"{folder}: class folders {', '.join(unknown)} are not classes of the model "
                        f"({', '.join(class_names)}); rename the folders to the model's class names")
    missing = [c for c in class_names if c not in found]
    if missing:
        warn(f"{folder}: no folder for class {', '.join(missing)}; metrics that need it are reported as null")
    images = list_images(folder, found)
    listed = [(p, class_names.index(c)) for c in found for p in images[c]]
    if not listed:
        raise UserError(f"{folder}: no images in its class folders; add {IMAGE_KINDS} files")
    paths = [p for p, _ in listed]
    patient = group_key(None)  # a DICOM file's PatientID: the bootstrap resamples patients
    return Dataset.from_files(class_names, {split: listed},
                              metadata={"patient": {p: patient(p) if is_dicom_file(p) else None for p in paths},
                                        **dicom_metadata(paths)})


def describe(dataset):
    """Lines that show the class names and how many images of each class each split holds."""
    counts = dataset.counts()
    if dataset.multi_label:
        rows = ["images", *dataset.class_names]
        width = max(len(n) for n in rows)
        lines = [f"Findings (model output order): {', '.join(dataset.class_names)}; positive images per split:"]
        lines.append(f"{'':{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
        return "\n".join(lines + [f"{name:{width}}  " + "  ".join(f"{counts[s][name]:>6}" for s in SPLITS)
                                  for name in rows])
    width = max(len(n) for n in dataset.class_names)
    lines = [f"Classes (model output order): {', '.join(dataset.class_names)}"]
    lines.append(f"{'':{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
    for name in dataset.class_names:
        lines.append(f"{name:{width}}  " + "  ".join(f"{counts[s][name]:>6}" for s in SPLITS))
    return "\n".join(lines)


def _multi_label_splits(path, rows, findings):
    missing = [f for f in findings if f not in rows[0]]
    if missing:
        raise UserError(f"{path}: no column for {', '.join(missing)}; give the splits.csv of this model's training run")
    gone = [r["path"] for r in rows if not Path(r["path"]).is_file()]
    if gone:
        raise UserError(f"{path}: listed images are gone: {list_paths(gone)}; evaluate where the data still is")
    labels = np.array([[float(r[f]) if r[f] != "" else np.nan for f in findings] for r in rows], np.float32)
    return Dataset(list(findings), [Path(r["path"]) for r in rows], labels, {},
                   {"evaluated": np.arange(len(rows))}, multi_label=True)


def read_splits_csv(path, class_names, split):
    """A Dataset of the images a training run listed under `split` in its reports/splits.csv, as one split
    "evaluated" (the run's carved test split can be evaluated again this way)."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = [{k: from_spreadsheet_safe(v) for k, v in r.items()} for r in csv.DictReader(f)
                    if r.get("split") == split]
    except OSError as error:
        raise UserError(f"{path}: can't read it ({error.strerror}); give a training run's reports/splits.csv") from None
    if not rows:
        raise UserError(f"{path}: no images in split {split!r}; give a training run's reports/splits.csv and one of "
                        "its splits (train, val, test)")
    if "class" not in rows[0]:  # a multi-label run's: one column per finding
        return _multi_label_splits(path, rows, class_names)
    unknown = sorted({r["class"] for r in rows} - set(class_names))
    if unknown:
        raise UserError(f"{path}: classes {', '.join(unknown)} are not classes of the model ({', '.join(class_names)})")
    missing = [r["path"] for r in rows if not Path(r["path"]).is_file()]
    if missing:
        raise UserError(f"{path}: listed images are gone: {list_paths(missing)}; evaluate where the data still is")
    return Dataset.from_files(class_names, {"evaluated": [(Path(r["path"]), class_names.index(r["class"]))
                                                          for r in rows]})
