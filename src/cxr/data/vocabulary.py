"""What each finding is called in DICOM: a SNOMED CT code (and a RadLex ID) for every class or finding cxr knows.

The vocabulary ships as data, `findings.csv` beside this module: the Kermany classes, the 14 findings of NIH
ChestX-ray14 and the 14 of CheXpert, each once, with the names other datasets give it as synonyms (NIH "Effusion"
is CheXpert's "Pleural Effusion"; "No Finding" is "Normal"). A class is matched by its name with case, spaces,
underscores and hyphens ignored. Codes were taken from DICOM PS3.16 (Normal, Mass, Nodule, Pleural effusion,
Pneumothorax, Pulmonary edema) and otherwise from SNOMED CT concepts that several independent public mappings give
for the same finding; a finding with no code that could be checked that way has none (docs/pacs.md lists them),
rather than an invented one. A site's own classes, or a code the site prefers, come from a codes file
(`read_codes`): class,code,meaning[,scheme], where the scheme is a DICOM coding scheme designator (default SCT).
"""

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cxr.errors import UserError

VOCABULARY = Path(__file__).with_name("findings.csv")
CODES_HELP = ("a CSV with a header row class,code,meaning and optionally scheme (a DICOM coding scheme designator, "
              "default SCT), one row per class")


@dataclass(frozen=True)
class Code:
    """A coded concept: `value` in coding `scheme` (SCT, RADLEX, or a site's own), with its `meaning`."""
    value: str
    scheme: str
    meaning: str


def normalized(name):
    """A class name as the vocabulary matches it: lower case, with runs of spaces, underscores and hyphens as one
    space."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@lru_cache(maxsize=1)
def vocabulary():
    """{normalized name or synonym: the vocabulary's row} for every finding in findings.csv."""
    entries = {}
    with open(VOCABULARY, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for name in [row["finding"], *filter(None, row["synonyms"].split("|"))]:
                entries[normalized(name)] = row
    return entries


def known_code(name):
    """The SNOMED CT `Code` of a class or finding the vocabulary knows under this name, else None."""
    row = vocabulary().get(normalized(name))
    return Code(row["sct_code"], "SCT", row["sct_meaning"]) if row and row["sct_code"] else None


def radlex_id(name):
    """The RadLex ID (e.g. RID28493) of a finding the vocabulary knows under this name, else None."""
    row = vocabulary().get(normalized(name))
    return (row["radlex_id"] or None) if row else None


def read_codes(path):
    """{class name: Code} from a codes file; UserError naming the file and row for anything unusable."""
    fix = f"give {CODES_HELP}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [normalized(h) for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--codes {path}: not readable ({error.strerror if isinstance(error, OSError) else error}); "
                        f"{fix}") from None
    if not rows or not {"class", "code", "meaning"} <= set(header):
        raise UserError(f"--codes {path}: needs the columns class, code and meaning; {fix}")
    codes = {}
    for number, row in enumerate(rows, start=2):
        row = {normalized(k): (v or "").strip() for k, v in row.items() if k is not None}
        name, value, meaning, scheme = row["class"], row["code"], row["meaning"], row.get("scheme") or "SCT"
        if not (name and value and meaning):
            raise UserError(f"--codes {path}, row {number}: class, code and meaning must each be given; {fix}")
        if len(meaning) > 64 or len(scheme) > 16 or not re.fullmatch(r"[A-Za-z0-9_.\-]+", scheme):
            raise UserError(f"--codes {path}, row {number}: a meaning is at most 64 characters and a scheme a "
                            "DICOM coding scheme designator (at most 16 letters, digits, '.', '-' or '_'), such "
                            "as SCT or RADLEX")
        if "\\" in value + meaning:
            raise UserError(f"--codes {path}, row {number}: DICOM does not allow a backslash in a code or meaning")
        if name in codes:
            raise UserError(f"--codes {path}, row {number}: {name!r} is given a code twice")
        codes[name] = Code(value, scheme.upper() if scheme.upper() in ("SCT", "RADLEX") else scheme, meaning)
    return codes


def site_codes(class_names, own):
    """({class name: Code} for the classes `own` (from `read_codes`) gives a code, names in `own` that are no class
    of the model), matching names as the vocabulary does."""
    by_name = {normalized(name): name for name in class_names}
    matched = {by_name[normalized(name)]: code for name, code in own.items() if normalized(name) in by_name}
    return matched, [name for name in own if normalized(name) not in by_name]


def coding(class_names, own=None):
    """{class name: Code or None}: the site's own code (`own`: {class name: Code}) where it gives one, else the
    vocabulary's, else None (the result is then written under cxr's private scheme)."""
    own = site_codes(class_names, own or {})[0]
    return {name: own.get(name) or known_code(name) for name in class_names}


def uncoded_warning(class_names, own=None):
    """One line naming the classes without a standard code, or None when every class has one."""
    missing = [name for name, code in coding(class_names, own).items() if code is None]
    if not missing:
        return None
    return (f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no SNOMED CT code cxr knows: DICOM "
            f"results code {'it' if len(missing) == 1 else 'them'} under cxr's private scheme 99CXR, which other "
            f"systems do not understand; give codes with --codes FILE ({CODES_HELP})")
