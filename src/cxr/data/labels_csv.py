"""A labels table (one row per image, one or more findings each) -> a multi-label `Dataset`, split by patient.

Three formats, recognised from the header or named with `--label-format`:

- ``nih``: NIH ChestX-ray14's ``Data_Entry_2017.csv``: ``Image Index``, ``Finding Labels`` (findings joined by
  ``|``, or ``No Finding``), ``Patient ID``, ``View Position`` (two of its other headers contain a comma and
  so span two columns, as in the file NIH publishes; they are read as they are).
- ``chexpert``: CheXpert's ``train.csv`` / ``valid.csv``: ``Path`` (``.../patient00001/study1/view1_frontal.jpg``:
  the patient is in it), ``Frontal/Lateral``, ``AP/PA`` and the observation columns, each 1, 0, -1 (uncertain)
  or blank. A blank means the report did not mention the finding: unknown, except on a row whose
  ``No Finding`` is 1, where every unmentioned finding is absent (as TorchXRayVision reads it). ``-1`` follows
  ``--uncertain``: ignore (unknown; the default), zeros or ones.
- ``columns``: a path column and one column per finding holding 1, 0, -1 (uncertain, as ``--uncertain`` says),
  true, false, or blank / nan (unknown), with optional patient and view columns (MIMIC-CXR-JPG after joining its
  label and metadata tables, a hospital's own export). A patient column is found by name (patient_id,
  PatientID, subject_id, ...) when ``--patient-column`` doesn't name one; without one, each image is its own
  patient, with a warning. Columns that hold anything else are not findings, and are listed in a warning.

The CSV is UTF-8 (with or without a byte order mark) or, failing that, Windows-1252 with a warning; a header
that names a column twice is refused. Image paths are relative to the images folder and stay inside it. Labels are 1, 0 or NaN (unknown): the `Dataset` contract.
Nothing here reads an image; a path that does not exist is refused with its line.
"""

import csv
import dataclasses
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.data import cohort
from cxr.data.dataset import Dataset
from cxr.errors import UserError, warn

FORMATS = ("nih", "chexpert", "columns")
UNCERTAIN = ("ignore", "zeros", "ones")
FRONTAL_VIEWS = ("PA", "AP")
MIN_POSITIVES = 5  # a finding trains by default when the training split holds at least this many positives
NO_FINDING = "No Finding"
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
NIH_METADATA = {"age": "Patient Age", "sex": "Patient Gender"}
CHEXPERT_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA")
CHEXPERT_OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_METADATA = {"age": "Age", "sex": "Sex"}
CHEXPERT_PATIENT = re.compile(r"(patient\d+)")
PATH_COLUMNS = ("path", "image", "image_path", "filename", "file", "dicom_path")
BINARY_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": np.nan}
CHEXPERT_VALUES = BINARY_VALUES | {"-1": -1.0, "-1.0": -1.0}
# What a finding column of the columns format may hold (MIMIC-CXR's tables: 1.0, 0.0, -1.0 uncertain, blank or
# nan unknown; spreadsheets: TRUE / FALSE), in lower case
COLUMN_VALUES = CHEXPERT_VALUES | {"nan": np.nan, "true": 1.0, "false": 0.0}
# Patient columns the columns format recognises by name, compared in lower case without spaces or underscores
PATIENT_COLUMNS = ("patientid", "patient", "subjectid", "subject", "mrn")


@dataclass
class LabelOptions:
    """How a labels CSV is read: the `cxr train --labels` options (and evaluate's and calibrate's)."""

    label_format: str = None  # nih | chexpert | columns; None: from the header
    findings: list = None  # None: every finding with MIN_POSITIVES positives in the training split
    uncertain: str = "ignore"  # CheXpert's -1: ignore (unknown) | zeros | ones
    views: list = FRONTAL_VIEWS  # None or []: every view
    path_column: str = None  # columns format; None: the first of PATH_COLUMNS in the header
    patient_column: str = None
    view_column: str = None
    subgroups: list = ()  # further columns kept as metadata, for the subgroup analysis (--subgroup)


@dataclass
class Table:
    """A labels CSV read into memory: one entry per image (sorted by path)."""

    findings: list  # the label columns, in the file's order
    paths: list  # (N,) Path
    labels: np.ndarray  # (N, findings) float32: 1, 0, NaN
    metadata: dict  # column -> (N,) list: "patient", "view", "age", "sex" where the format has them
    lines: list  # (N,) the CSV line of each image, for messages


def read_rows(csv_path):
    """(header, [(line number, row)]) of `csv_path`; UserError when it is not a readable CSV."""
    csv_path = Path(csv_path)
    try:
        data = csv_path.read_bytes()
    except OSError as error:
        raise UserError(f"{csv_path}: can't read it ({error.strerror}); give the labels CSV with --labels") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:  # Excel's default on Western Windows; every byte is a character there
        text = data.decode("cp1252", errors="replace")
        warn(f"{csv_path}: not UTF-8; read as Windows-1252 (Excel's default): check that finding names with accents "
             "read right, or save the CSV as UTF-8")
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [h.strip() for h in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise UserError(f"{csv_path}: not a readable CSV ({error}); save it as comma-separated values") from None
    if not header or not rows:
        raise UserError(f"{csv_path}: no header or no rows; give a CSV with one header line and one row per image")
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise UserError(f"{csv_path}: the column {', '.join(repr(h) for h in repeated)} appears more than once in its "
                        "header; give each column its own name")
    return header, rows


def detect_format(header):
    if "Image Index" in header or "Finding Labels" in header:
        return "nih"
    if "Path" in header and ("Frontal/Lateral" in header or any(c in header for c in CHEXPERT_OBSERVATIONS[1:])):
        return "chexpert"
    return "columns"


def read_table(csv_path, images_dir, options=LabelOptions()):
    """The labels CSV at `csv_path` (images under `images_dir`) as a `Table`, filtered by view.

    UserError naming the file, the line and the column for anything it can't use.
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: no such folder; give --images the folder that the CSV's image paths are "
                        "relative to")
    header, rows = read_rows(csv_path)
    if cohort.key_column(header) and not any(c.lower() in PATH_COLUMNS for c in header) and not options.path_column:
        header, rows = cohort.keyed_rows(csv_path, header, rows, images_dir)  # a `cxr pull` folder's labels
        options = dataclasses.replace(options, path_column="path", patient_column=options.patient_column or
                                      "patient_key", view_column=options.view_column or "view")
    fmt = options.label_format or detect_format(header)
    if fmt not in FORMATS:
        raise UserError(f"--label-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if options.uncertain not in UNCERTAIN:
        raise UserError(f"--uncertain must be one of {', '.join(UNCERTAIN)}, got {options.uncertain!r}")
    reader = {"nih": _nih, "chexpert": _chexpert, "columns": _columns}[fmt]
    findings, entries = reader(csv_path, header, rows, options)  # one entry per row, in order
    for column in options.subgroups or ():
        if column not in header:
            raise UserError(f"{csv_path}: no column {column!r} for --subgroup; its columns are {', '.join(header)}")
        for (_, row), (_, _, _, meta) in zip(rows, entries):
            meta[column] = _cell(row, header.index(column)) or None
    table = _collect(csv_path, images_dir, findings, entries)
    return _filter_views(csv_path, table, options.views)


def _require(csv_path, header, columns, fmt):
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{csv_path}: no column {', '.join(repr(c) for c in missing)} in its header; the {fmt} format "
                        f"needs {', '.join(columns)} (or choose another with --label-format {'|'.join(FORMATS)})")
    return {c: header.index(c) for c in header}


def _cell(row, index):
    return row[index].strip() if index is not None and index < len(row) else ""


def _nih(csv_path, header, rows, options):
    """Findings from `Finding Labels`: every name that occurs (No Finding is the absence of all)."""
    at = _require(csv_path, header, NIH_COLUMNS, "nih")
    parsed = []
    for line, row in rows:
        text = _cell(row, at["Finding Labels"])
        names = [n.strip() for n in text.split("|")]
        if not text or any(not n for n in names) or (NO_FINDING in names and len(names) > 1):
            raise UserError(f"{csv_path} line {line}, column 'Finding Labels': {text!r} is not findings joined by "
                            f"'|' or '{NO_FINDING}'; correct that row")
        parsed.append((line, row, [n for n in names if n != NO_FINDING]))
    findings = sorted({n for _, _, names in parsed for n in names})
    entries = []
    for line, row, names in parsed:
        entries.append((line, _cell(row, at["Image Index"]), [1.0 if f in names else 0.0 for f in findings], {
            "patient": _cell(row, at["Patient ID"]) or None, "view": _cell(row, at["View Position"]).upper() or None,
            **{k: _cell(row, at.get(c)) or None for k, c in NIH_METADATA.items()}}))
    return findings, entries


def _chexpert(csv_path, header, rows, options):
    at = _require(csv_path, header, CHEXPERT_COLUMNS, "chexpert")
    observations = [c for c in header if c in CHEXPERT_OBSERVATIONS]
    findings = [c for c in observations if c != NO_FINDING]
    uncertain = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[options.uncertain]
    entries = []
    for line, row in rows:
        values = {}
        for column in observations:
            text = _cell(row, at[column])
            if text not in CHEXPERT_VALUES:
                raise UserError(f"{csv_path} line {line}, column {column!r}: {text!r} is not 1, 0, -1 or blank; "
                                "correct that row")
            values[column] = CHEXPERT_VALUES[text]
        healthy = values.get(NO_FINDING) == 1.0
        labels = [uncertain if values[f] == -1.0 else 0.0 if healthy and np.isnan(values[f]) else values[f]
                  for f in findings]
        path = _cell(row, at["Path"])
        patient = CHEXPERT_PATIENT.search(path)
        frontal = _cell(row, at["Frontal/Lateral"]).lower() != "lateral"
        entries.append((line, path, labels, {
            "patient": patient.group(1) if patient else None,
            "view": (_cell(row, at["AP/PA"]).upper() or None) if frontal else "LATERAL",
            **{k: _cell(row, at.get(c)) or None for k, c in CHEXPERT_METADATA.items()}}))
    return findings, entries


def _columns(csv_path, header, rows, options):
    """A path column, optional patient and view columns, and every other column holding only 1, 0 or blank."""
    path_column = options.path_column or next((c for c in header if c.lower() in PATH_COLUMNS), None)
    if path_column is None:
        raise UserError(f"{csv_path}: no path column (one of {', '.join(PATH_COLUMNS)}) in its header; name it with "
                        "--path-column, or choose the format with --label-format nih|chexpert")
    patient_column = options.patient_column or next(
        (c for c in header if c.lower().replace(" ", "").replace("_", "") in PATIENT_COLUMNS), None)
    named = [c for c in (path_column, patient_column, options.view_column, *(options.subgroups or ())) if c]
    at = _require(csv_path, header, named, "columns")
    others = [c for c in header if c not in named and c]

    def value(row, column):
        return _cell(row, at[column]).lower()

    findings = [c for c in others if all(value(row, c) in COLUMN_VALUES for _, row in rows)]
    if options.findings:
        for name in options.findings:
            if name in others and name not in findings:
                line, row = next((line, row) for line, row in rows if value(row, name) not in COLUMN_VALUES)
                raise UserError(f"{csv_path} line {line}, column {name!r}: {_cell(row, at[name])!r} is not 1, 0, -1 "
                                "(uncertain), true, false or blank; correct that row")
    if not findings:
        raise UserError(f"{csv_path}: no finding columns (columns holding only 1, 0, -1, true, false or blank); add "
                        "one column per finding, or choose the format with --label-format nih|chexpert")
    ignored = [c for c in others if c not in findings and c not in (options.findings or ())]
    if ignored:
        warn(f"{csv_path}: column{'s' if len(ignored) > 1 else ''} {', '.join(repr(c) for c in ignored[:5])}"
             f"{' and more' if len(ignored) > 5 else ''} not read as findings (values other than 1, 0, -1, true, "
             "false or blank)")
    if patient_column is None:
        warn(f"{csv_path}: no patient column (name it with --patient-column): each image is taken as its own "
             "patient, so one patient's images may fall into two splits")
    uncertain = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[options.uncertain]
    entries = []
    for line, row in rows:
        labels = [COLUMN_VALUES[value(row, f)] for f in findings]
        entries.append((line, _cell(row, at[path_column]), [uncertain if v == -1.0 else v for v in labels], {
            "patient": _cell(row, at.get(patient_column)) or None,
            "view": _cell(row, at.get(options.view_column)).upper() or None}))
    return findings, entries


def _collect(csv_path, images_dir, findings, entries):
    """A Table from (line, relative path, labels, metadata) entries: paths checked, repeated rows merged."""
    by_path, lines = {}, {}
    root = images_dir.resolve()
    for line, relative, labels, meta in entries:
        if not relative:
            raise UserError(f"{csv_path} line {line}: no image path; fill it in or delete the row")
        path = images_dir / relative
        if not path.resolve().is_relative_to(root):  # an absolute path, or ../ out of the folder
            raise UserError(f"{csv_path} line {line}: the image path {relative} leads outside --images {images_dir}; "
                            "give paths relative to that folder")
        if path in by_path:
            if not np.array_equal(np.asarray(by_path[path][0]), np.asarray(labels), equal_nan=True):
                raise UserError(f"{csv_path} lines {lines[path]} and {line}: the image {relative} has two different "
                                "sets of labels; keep one row per image")
            continue
        by_path[path], lines[path] = (labels, meta), line
    missing = next((p for p in by_path if not p.is_file()), None)
    if missing is not None:
        raise UserError(f"{csv_path} line {lines[missing]}: image {missing} does not exist; check --images (the CSV's "
                        "paths are relative to it)")
    repeated = len(entries) - len(by_path)
    if repeated:
        warn(f"{csv_path}: {repeated} rows repeat an image with the same labels; each image is used once")
    paths = sorted(by_path)
    columns = sorted({k for labels, meta in by_path.values() for k in meta})
    return Table(list(findings), paths, np.array([by_path[p][0] for p in paths], np.float32).reshape(len(paths), -1),
                 {c: [by_path[p][1].get(c) for p in paths] for c in columns}, [lines[p] for p in paths])


def _filter_views(csv_path, table, views):
    if not views or "view" not in table.metadata:
        return table
    wanted = {v.upper() for v in views}
    keep = [i for i, v in enumerate(table.metadata["view"]) if v is None or v in wanted]
    excluded = Counter(v for v in table.metadata["view"] if v is not None and v not in wanted)
    if excluded:
        print(f"{csv_path}: left out {sum(excluded.values())} images of other views than {', '.join(views)} "
              f"({', '.join(f'{n} {v}' for v, n in sorted(excluded.items()))}); --views sets which are used")
    if not keep:
        raise UserError(f"{csv_path}: no image of the views {', '.join(views)}; choose others with --views")
    return subset(table, keep)


def subset(table, rows):
    return Table(table.findings, [table.paths[i] for i in rows], table.labels[rows],
                 {c: [v[i] for i in rows] for c, v in table.metadata.items()}, [table.lines[i] for i in rows])


def select_findings(csv_path, table, requested, train_rows=None):
    """The findings a model learns: `requested` (each must be a column and have a positive), else every finding
    with at least MIN_POSITIVES positives in `train_rows` (a warning names the others)."""
    positives = np.nansum(table.labels[train_rows if train_rows is not None else slice(None)], axis=0)
    if requested:
        unknown = [f for f in requested if f not in table.findings]
        if unknown:
            raise UserError(f"{csv_path}: no finding {', '.join(repr(f) for f in unknown)}; its findings are "
                            f"{', '.join(table.findings)}")
        absent = [f for f in requested if np.nansum(table.labels[:, table.findings.index(f)]) == 0]
        if absent:
            raise UserError(f"{csv_path}: no image is positive for {', '.join(absent)}; a model can't learn a finding "
                            "it never sees: leave it out of --findings")
        return list(requested)
    chosen = [f for f, n in zip(table.findings, positives) if n >= MIN_POSITIVES]
    left_out = [f"{f} ({int(n)})" for f, n in zip(table.findings, positives) if n < MIN_POSITIVES]
    if left_out:
        warn(f"{csv_path}: left out findings with fewer than {MIN_POSITIVES} positives in the training split: "
             f"{', '.join(left_out)}; name them with --findings to train them anyway")
    if not chosen:
        raise UserError(f"{csv_path}: no finding has {MIN_POSITIVES} positives in the training split; add images or "
                        "name the findings with --findings")
    return chosen


def to_dataset(table, findings, splits):
    """The multi-label `Dataset` of `table`'s columns `findings`, with `splits` {name: rows}."""
    columns = [table.findings.index(f) for f in findings]
    return Dataset(list(findings), list(table.paths), np.ascontiguousarray(table.labels[:, columns]),
                   dict(table.metadata), {k: np.asarray(v, np.int64) for k, v in splits.items()}, multi_label=True)


def read_test_list(path, table, images_dir):
    """Rows of `table` named in the official test list at `path` (one image path per line, as NIH's
    test_list.txt, relative to the images folder or by file name)."""
    try:
        names = {line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: can't read the test list ({error}); give a text file of image paths") from None
    rows = [i for i, p in enumerate(table.paths)
            if p.name in names or str(p.relative_to(images_dir)) in names]
    if not rows:
        raise UserError(f"{path}: none of its images is in the labels CSV; give the test list of the same dataset")
    return rows


def stratified_patient_splits(table, fractions, seed, test_rows=None):
    """{"train", "val", "test": rows}: patients (never split) dealt by iterative stratification (Sechidis et al.
    2011, the iterative-stratification package) over every finding at once, plus "no finding", seeded.

    `fractions`: {"val": f, "test": f} of patients; with `test_rows` (an official test list), the test split is
    those images and every image of their patients, and validation is carved from the rest.
    """
    from iterstrat.ml_stratifiers import IterativeStratification

    keys = [p if p is not None else f"row-{i}" for i, p in enumerate(table.metadata.get("patient", [None] *
                                                                                          len(table.paths)))]
    patients = sorted(set(keys))
    index = {k: i for i, k in enumerate(patients)}
    member = np.array([index[k] for k in keys])
    known = np.nan_to_num(table.labels, nan=0.0)
    per_patient = np.zeros((len(patients), known.shape[1] + 1), dtype=int)
    np.maximum.at(per_patient[:, :-1], member, known.astype(int))
    per_patient[:, -1] = per_patient[:, :-1].max(axis=1) == 0  # "no finding" is stratified too
    fold = np.full(len(patients), -1)
    pool = np.arange(len(patients))
    if test_rows is not None:
        test_patients = np.unique(member[test_rows])
        others = set(test_patients) & set(member[np.setdiff1d(np.arange(len(keys)), test_rows)])
        if others:
            warn(f"{len(others)} patients of the test list also have images outside it; those go to the test split "
                 "too, so that no patient is in two splits")
        fold[test_patients] = 2
        pool = np.flatnonzero(fold < 0)
        shares = np.array([1 - fractions["val"], fractions["val"]])
    else:
        shares = np.array([1 - fractions["val"] - fractions["test"], fractions["val"], fractions["test"]])
    dealt = IterativeStratification(per_patient[pool].astype(bool), shares, np.random.RandomState(seed))
    fold[pool] = dealt
    by_row = fold[member]
    return {name: np.flatnonzero(by_row == k) for k, name in enumerate(("train", "val", "test"))}


def read_labelled_table(csv_path, images_dir, options, config, test_list=None):
    """Training's dataset from a labels CSV: read, split by patient, findings chosen on the training split."""
    table = read_table(csv_path, images_dir, options)
    test_rows = read_test_list(test_list, table, Path(images_dir)) if test_list else None
    splits = stratified_patient_splits(table, {"val": config.val_split, "test": config.test_split}, config.seed,
                                       test_rows)
    findings = select_findings(csv_path, table, options.findings, splits["train"])
    dataset = to_dataset(table, findings, splits)
    for name, rows in splits.items():
        if not len(rows):
            raise UserError(f"{csv_path}: the {name} split is empty; it needs more patients")
    return dataset


def read_evaluation_table(csv_path, images_dir, options, findings, split="evaluated"):
    """A labels CSV as one split labelled with a model's `findings`; findings the CSV lacks are unknown (NaN)."""
    table = read_table(csv_path, images_dir, options)
    missing = [f for f in findings if f not in table.findings]
    if len(missing) == len(findings):
        raise UserError(f"{csv_path}: holds none of the model's findings ({', '.join(findings)}); give a CSV that "
                        "labels them")
    if missing:
        warn(f"{csv_path}: no labels for {', '.join(missing)}; their metrics are reported as null")
    labels = np.full((len(table.paths), len(findings)), np.nan, np.float32)
    for k, f in enumerate(findings):
        if f in table.findings:
            labels[:, k] = table.labels[:, table.findings.index(f)]
    return Dataset(list(findings), list(table.paths), labels, dict(table.metadata),
                   {split: np.arange(len(table.paths))}, multi_label=True)
