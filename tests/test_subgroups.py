"""Subgroup analysis (issue 33): groups from a labels CSV and from DICOM tags, per-group metrics against the
same metrics computed by hand on the group's rows, gaps flagged when they are there, small groups marked,
and no per-image metadata in any output."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.cli import main
from cxr.data.split import read_labelled_folder
from cxr.evaluate.subgroups import MIN_GROUP, Scored, age_band, groups_of, subgroup_analysis
from cxr.model.task import Classes, Findings
from tests.conftest import SAMPLE
from tests.test_dicom import grey_xray, write_dicom
from tests.conftest import NIH_IMAGES, nih_rows, write_lines
from tests.test_multilabel import needs_nih


def test_ages_and_sexes_are_aggregated_into_groups():
    assert [age_band(a) for a in ("5", "017Y", "18", "061Y", "79", "80", "95", "006M", "x", None)] == [
        "0-17", "0-17", "18-39", "60-79", "60-79", "80+", "80+", "0-17", None, None]
    assert age_band("45", edges=(50,)) == "0-49" and age_band("50", edges=(50,)) == "50+"
    groups = groups_of({"sex": ["M", "Female", "F", None], "view": ["PA", "AP", "LL", ""]}, [0, 1, 2, 3])
    assert list(groups["sex"]) == ["male", "female", "female", None]
    assert list(groups["view"]) == ["PA", "AP", "other", None]
    assert "age" not in groups  # no such column: no such attribute


def two_groups(n_a=60, n_b=60, sensitivity_b=0.9, seed=0):
    """Binary labels, scores and calls for groups a and b; group a's positives are called at sensitivity 0.9,
    b's at `sensitivity_b`."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], (n_a + n_b) // 2)
    group = np.array(["a"] * n_a + ["b"] * n_b, dtype=object)
    rate = np.where(group == "a", 0.9, sensitivity_b)
    called = np.where(y == 1, rng.random(len(y)) < rate, rng.random(len(y)) < 0.1).astype(int)
    scores = np.clip(0.5 * called + 0.3 * y + 0.2 * rng.random(len(y)), 0, 1)
    return y, np.stack([1 - scores, scores], axis=1), called, group


def test_per_group_numbers_are_the_groups_own_and_a_real_gap_is_flagged():
    y, probabilities, called, group = two_groups(sensitivity_b=0.3)
    result = subgroup_analysis({"site": group}, Scored(y, probabilities, called, Classes(["N", "P"]), positive_index=1),
                               np.arange(len(y)).astype(str), n_resamples=300, seed=0)["site"]
    for name in ("a", "b"):
        rows = group == name
        numbers = result["groups"][name]
        positives = y[rows] == 1
        assert numbers["n_images"] == rows.sum() and numbers["prevalence"] == pytest.approx(positives.mean())
        assert numbers["sensitivity"] == pytest.approx(called[rows][positives].mean())
        assert numbers["specificity"] == pytest.approx(1 - called[rows][~positives].mean())
        assert numbers["auc_roc"] == pytest.approx(roc_auc_score(positives, probabilities[rows, 1]))
        low, high = numbers["ci"]["sensitivity"]
        assert low <= numbers["sensitivity"] <= high
    gap = result["gaps"]["sensitivity"]
    assert gap["groups"] == ["b", "a"] and gap["flagged"] and gap["ci"][0] > 0


def test_no_gap_is_flagged_where_there_is_none_and_small_groups_are_marked_not_hidden():
    y, probabilities, called, group = two_groups(sensitivity_b=0.9, seed=3)
    y, probabilities, called = np.concatenate([y, [1, 0]]), np.concatenate([probabilities, [[0.2, 0.8]] * 2]), \
        np.concatenate([called, [1, 1]])
    group = np.concatenate([group, ["tiny", "tiny"]])
    result = subgroup_analysis({"site": group}, Scored(y, probabilities, called, Classes(["N", "P"]), positive_index=1),
                               np.arange(len(y)).astype(str), n_resamples=300, seed=0)["site"]
    assert not result["gaps"]["sensitivity"]["flagged"] and not result["gaps"]["specificity"]["flagged"]
    assert result["groups"]["tiny"]["small"] and result["groups"]["tiny"]["n_images"] == 2 < MIN_GROUP
    assert "tiny" not in result["gaps"]["sensitivity"]["groups"]  # too small to make a gap, still shown


def test_multi_label_groups_get_the_mean_auc_and_each_findings_sensitivity():
    rng = np.random.default_rng(2)
    labels = (rng.random((80, 2)) < 0.4).astype(np.float32)
    labels[:5, 1] = np.nan
    scores = np.clip(labels * 0.4 + rng.random((80, 2)) * 0.6, 0, 1)
    scores = np.nan_to_num(scores, nan=0.5)
    called = (scores >= 0.5).astype(int)
    group = np.array(["x"] * 40 + ["y"] * 40, dtype=object)
    result = subgroup_analysis({"sex": group}, Scored(labels, scores, called, Findings(["A", "B"])),
                               np.arange(80).astype(str), n_resamples=50)["sex"]["groups"]["x"]
    known = ~np.isnan(labels[:40, 1])
    auc_b = roc_auc_score(labels[:40][known, 1], scores[:40][known, 1])
    assert result["B auc_roc"] == pytest.approx(auc_b)
    assert result["auc_roc"] == pytest.approx((roc_auc_score(labels[:40, 0], scores[:40, 0]) + auc_b) / 2)
    positives = labels[:40, 0] == 1
    assert result["A sensitivity"] == pytest.approx(called[:40][positives, 0].mean())


def test_dicom_tags_give_the_groups_of_a_folder(tmp_path):
    pixels = grey_xray()
    for k in range(6):
        write_dicom(tmp_path / "data" / ("NORMAL" if k % 2 else "PNEUMONIA") / f"{k}.dcm", pixels,
                    PatientSex="F" if k < 3 else "M", PatientAge=f"0{30 + 10 * k}Y", ViewPosition="PA",
                    Manufacturer="Acme", ManufacturerModelName="X1")
    dataset = read_labelled_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"])
    groups = groups_of(dataset.metadata, dataset.splits["evaluated"])
    assert sorted(groups) == ["age", "device_model", "manufacturer", "sex", "view"]
    assert sorted(set(groups["sex"])) == ["female", "male"] and set(groups["manufacturer"]) == {"Acme"}
    assert sorted(set(groups["age"])) == ["18-39", "40-59", "60-79", "80+"]  # 30, 40, ... 80 years


@needs_nih
def test_an_evaluation_reports_subgroups_from_the_csv_and_keeps_ages_and_ids_out(tiny_multilabel, tmp_path, capsys):
    outputs, _ = tiny_multilabel
    csv_path = write_lines(tmp_path / "eval.csv", nih_rows(60, start=150))
    assert main(["evaluate", "--model", str(outputs / "models/model.h5"), "--labels", str(csv_path), "--images",
                 str(NIH_IMAGES), "--output-dir", str(tmp_path / "ev"), "--bootstrap", "40"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "ev/reports/summary.json").read_text())
    assert {"sex", "age", "view"} <= set(summary["subgroups"])
    sexes = summary["subgroups"]["sex"]["groups"]
    assert set(sexes) <= {"female", "male"} and sum(g["n_images"] for g in sexes.values()) == 60
    page = (tmp_path / "ev/reports/report.html").read_text()
    assert "Subgroups" in page and (tmp_path / "ev/plots/subgroups.png").is_file()
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
    outputs_text = page + json.dumps(summary)
    for row in rows[:20]:  # no image's own patient id or exact age
        assert f"Patient ID {row[3]}" not in outputs_text and f'"{row[3]}"' not in json.dumps(summary["subgroups"])
    assert all(len(group) > 3 or group in ("PA", "AP") for group in summary["subgroups"]["age"]["groups"])


def test_folders_without_metadata_say_why_there_is_no_subgroup_analysis(tiny_run, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tiny_run / "models/model.h5"), "--data-dir", str(SAMPLE),
                 "--output-dir", str(tmp_path / "ev"), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "ev/reports/summary.json").read_text())
    assert summary["subgroups"] == {}
    assert "No subgroup analysis was possible" in (tmp_path / "ev/reports/report.html").read_text()
