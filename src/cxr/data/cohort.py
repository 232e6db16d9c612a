"""A cohort folder as `cxr pull` writes it: `manifest.csv`, `images/`, and the secret its pseudonyms are made with.

A labels CSV for such a folder may name its images the way the hospital's own systems do, by SOP Instance UID or
by accession number, instead of by path: `keyed_rows` turns it into rows with the manifest's paths, patient keys
and views. An accession number is matched through its pseudonymous key (the folder's secret), since the images
themselves no longer carry it.
"""

import csv
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cxr.errors import UserError, warn

MANIFEST = "manifest.csv"
COLUMNS = ("sop_instance_uid", "patient_key", "accession_key", "view", "path")
SECRET = Path(".cxr-pull") / "secret"
# key columns a labels CSV may have instead of a path, as compared: lower case, no spaces or underscores
KEY_COLUMNS = ("sopinstanceuid", "accessionnumber")


def pseudonym(secret, value, prefix):
    """A pseudonymous key for an identifier: `prefix` and 16 hex digits of its HMAC-SHA-256 under `secret`."""
    return prefix + hmac.new(secret, str(value).encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]


def folder_secret(folder, create=False):
    """The folder's secret for pseudonyms (made once when `create`, readable by its owner only); None if none."""
    path = Path(folder) / SECRET
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        made = Path(f"{path}.{os.getpid()}")
        fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(made, path)
    return path.read_bytes().strip()


def read_manifest(folder):
    """The manifest's rows ({column: value}) whose image is there; a last line cut off by a kill is dropped."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if all(r.get(c) is not None for c in COLUMNS) and (Path(folder) / r["path"]).is_file()]


def _compared(name):
    return name.lower().replace(" ", "").replace("_", "")


def key_column(header):
    """The labels CSV's SOP Instance UID or accession number column, or None."""
    return next((c for c in header if _compared(c) in KEY_COLUMNS), None)


def keyed_rows(csv_path, header, rows, folder):
    """(header, rows) of a labels CSV keyed by SOP Instance UID or accession number, as rows with the cohort's
    `path`, `patient_key` and `view` in place of the key: one row per instance (an accession number may have
    several). Rows naming no instance of the cohort are left out, with a warning."""
    column = key_column(header)
    manifest = read_manifest(folder)
    if not manifest:
        raise UserError(f"{csv_path}: names images by {column}, but {folder} has no {MANIFEST} of a `cxr pull` to "
                        "find them in; give --images the folder cxr pull wrote, or a CSV with a path column")
    at = header.index(column)
    if _compared(column) == "sopinstanceuid":
        by_key = {r["sop_instance_uid"]: [r] for r in manifest}

        def key(value):
            return value
    else:
        secret = folder_secret(folder)
        if secret is None:
            raise UserError(f"{csv_path}: names images by accession number, but {folder}/{SECRET} (the secret their "
                            "keys were made with) is gone; give a CSV keyed by sop_instance_uid or path")
        by_key = {}
        for r in manifest:
            by_key.setdefault(r["accession_key"], []).append(r)

        def key(value):
            return pseudonym(secret, value, "A")
    kept = [c for i, c in enumerate(header) if i != at]
    out, missing = [], 0
    for line, row in rows:
        found = by_key.get(key(row[at].strip()) if at < len(row) else "", [])
        missing += not found
        for instance in found:
            out.append((line, [v for i, v in enumerate(row) if i != at]
                        + [instance["path"], instance["patient_key"], instance["view"]]))
    if missing:
        warn(f"{csv_path}: {missing} row{'s name' if missing > 1 else ' names'} no image in {folder}/{MANIFEST} (not "
             "pulled, or left out as no radiograph); not read")
    return kept + ["path", "patient_key", "view"], out
