"""The vocabulary of findings (issue 47, item 2): every finding cxr knows, its synonyms across datasets, its
SNOMED CT code, and a site's own codes from a file."""

import csv

import pytest

from cxr.data import vocabulary
from cxr.errors import UserError

NIH = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
       "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
CHEXPERT = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]
KERMANY = ["NORMAL", "PNEUMONIA"]
# the findings whose SNOMED CT code could not be checked against DICOM PS3.16 or several independent public
# mappings: coded by a site's --codes file, or cxr's private scheme (docs/pacs.md)
UNCODED = {"Pleural_Thickening", "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other",
           "Support Devices"}

# Verhoeff's tables: the check digit every SNOMED CT identifier ends with
D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
     [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
     [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
     [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4]]
for _ in range(6):
    P.append([P[1][p] for p in P[-1]])


def verhoeff_valid(number):
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = D[check][P[i % 8][int(digit)]]
    return check == 0


def test_every_finding_of_kermany_nih_and_chexpert_is_known_and_coded_unless_no_code_could_be_checked():
    for name in KERMANY + NIH + CHEXPERT:
        assert vocabulary.normalized(name) in vocabulary.vocabulary(), name
        code = vocabulary.known_code(name)
        assert (code is None) == (name in UNCODED), name
        if code is not None:
            assert code.scheme == "SCT" and code.meaning and len(code.meaning) <= 64


def test_synonyms_across_datasets_share_one_code():
    same = [("Effusion", "Pleural Effusion"), ("No Finding", "NORMAL"), ("PNEUMONIA", "Pneumonia"),
            ("Edema", "Pulmonary edema"), ("pleural-effusion", "PLEURAL_EFFUSION")]
    for a, b in same:
        assert vocabulary.known_code(a) == vocabulary.known_code(b) is not None, (a, b)
    assert vocabulary.known_code("Effusion").value == "60046008"  # DICOM PS3.16's Pleural effusion
    assert vocabulary.radlex_id("Atelectasis") == "RID28493"
    assert vocabulary.known_code("COVID-19") is None and vocabulary.radlex_id("COVID-19") is None


def test_every_snomed_code_is_a_well_formed_concept_identifier():
    """A mistyped digit breaks the Verhoeff check digit; the partition identifier of a concept is 00."""
    with open(vocabulary.VOCABULARY, newline="") as f:
        rows = list(csv.DictReader(f))
    codes = [r["sct_code"] for r in rows if r["sct_code"]]
    assert len(codes) == len(set(codes)) >= 15
    for code in codes:
        assert code.isdigit() and 6 <= len(code) <= 18 and code[-3:-1] == "00" and verhoeff_valid(code), code
    assert not verhoeff_valid("95436003")  # a typo of Lung consolidation's 95436008 that is in public code
    names = [vocabulary.normalized(n) for r in rows for n in [r["finding"], *filter(None, r["synonyms"].split("|"))]]
    assert len(names) == len(set(names))  # no name means two findings


def write(path, text):
    path.write_text(text)
    return path


def test_a_site_codes_file_is_read_and_its_codes_come_first(tmp_path):
    codes = vocabulary.read_codes(write(tmp_path / "codes.csv", "class,code,meaning,scheme\n"
                                        "COVID-19,840539006,Disease caused by SARS-CoV-2,SCT\n"
                                        "pleural_thickening,PT1,Pleural thickening,99LOCAL\n"
                                        "Effusion,RID34539,Pleural effusion,radlex\n"))
    coded = vocabulary.coding(["COVID-19", "Pleural_Thickening", "Effusion", "Pneumonia", "Lung Opacity"], codes)
    assert coded["COVID-19"] == vocabulary.Code("840539006", "SCT", "Disease caused by SARS-CoV-2")
    assert coded["Pleural_Thickening"] == vocabulary.Code("PT1", "99LOCAL", "Pleural thickening")
    assert coded["Effusion"] == vocabulary.Code("RID34539", "RADLEX", "Pleural effusion")  # the site's, first
    assert coded["Pneumonia"] == vocabulary.known_code("Pneumonia") and coded["Lung Opacity"] is None
    warning = vocabulary.uncoded_warning(list(coded), codes)
    assert warning.startswith("Lung Opacity has no SNOMED CT code cxr knows") and "--codes FILE" in warning
    assert vocabulary.uncoded_warning(["NORMAL", "PNEUMONIA"]) is None
    matched, strangers = vocabulary.site_codes(["Effusion", "Mass"], codes)
    assert list(matched) == ["Effusion"] and strangers == ["COVID-19", "pleural_thickening"]


@pytest.mark.parametrize("text, message", [
    ("name,code\nA,1\n", "needs the columns class, code and meaning"),
    ("", "needs the columns class, code and meaning"),
    ("class,code,meaning\nA,1,One\nB,,Two\n", "row 3: class, code and meaning must each be given"),
    ("class,code,meaning\nA,1,One\nA,2,Two\n", "row 3: 'A' is given a code twice"),
    ("class,code,meaning,scheme\nA,1,One,not a scheme\n", "row 2: a meaning is at most 64 characters"),
    ("class,code,meaning\nA,1,One\\Two\n", "row 2: DICOM does not allow a backslash"),
])
def test_a_bad_codes_file_is_one_line_naming_the_row(tmp_path, text, message):
    with pytest.raises(UserError) as error:
        vocabulary.read_codes(write(tmp_path / "codes.csv", text))
    assert message in str(error.value) and str(tmp_path / "codes.csv") in str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_codes_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not readable"):
        vocabulary.read_codes(tmp_path / "absent.csv")
