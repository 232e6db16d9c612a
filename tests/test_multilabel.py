"""Multi-label datasets from a labels CSV (issue 27): the three formats and their errors on the real NIH file
and on CheXpert-style and generic CSVs built here, patient-disjoint stratified splits, masking of unknown
labels, per-finding operating points, and every command on a tiny multi-label model."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from cxr.cli import main
from cxr.training.config import Config
from cxr.data.labels_csv import (LabelOptions, read_labelled_table, read_table, select_findings,
                                 stratified_patient_splits)
from cxr.errors import UserError
from cxr.evaluate.metrics import confidence_intervals, finding_metrics, fit_finding_points
from tests.conftest import NIH_CSV, NIH_IMAGES, TINY as TINY_TRAINING, nih_rows, write_image, write_lines

TINY = [*TINY_TRAINING, "--bootstrap", "30"]
needs_nih = pytest.mark.skipif(not NIH_CSV.is_file(), reason="../shared/data/nih_chestxray14_sample is not here")


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def fingerprint(folder):
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line_error(argv, capsys):
    """The CLI's exit code and its stderr, which must be one 'cxr: error:' line without a traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- reading the formats -----------------------------------------------------------------------------------

@needs_nih
def test_the_real_nih_csv_reads_as_a_labels_matrix_with_patients_and_views():
    table = read_table(NIH_CSV, NIH_IMAGES)
    assert len(table.paths) == 414 and len(table.findings) == 14  # its two comma headers span two columns each
    rows = {p.name: i for i, p in enumerate(table.paths)}
    first = table.labels[rows["00000100_000.png"]]  # Atelectasis|Effusion|Infiltration
    assert {table.findings[k] for k in np.flatnonzero(first == 1)} == {"Atelectasis", "Effusion", "Infiltration"}
    assert not np.isnan(table.labels).any()  # NIH labels every finding: present or not
    no_finding = table.labels[rows["00000129_000.png"]]
    assert (no_finding == 0).all()
    assert int((table.labels.sum(axis=1) == 0).sum()) == 73  # the README's No Finding count
    positives = dict(zip(table.findings, table.labels.sum(axis=0)))
    assert positives["Infiltration"] == 82 and positives["Edema"] == 12  # the README's counts
    assert table.metadata["patient"][rows["00000100_000.png"]] == "100"
    assert set(table.metadata["view"]) == {"PA", "AP"}


def chexpert_csv(root):
    """A CheXpert-format CSV over 8 generated images (4 patients, one lateral view)."""
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly", "Edema",
              "Pleural Effusion"]
    rows = [
        ["train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "", "1.0", "-1.0", ""],
        ["train/patient00001/study1/view2_lateral.jpg", "Female", "68", "Lateral", "", "", "1.0", "-1.0", ""],
        ["train/patient00002/study1/view1_frontal.jpg", "Male", "87", "Frontal", "PA", "1.0", "", "", "0.0"],
        ["train/patient00003/study1/view1_frontal.jpg", "Male", "41", "Frontal", "AP", "", "0.0", "1.0", "1.0"],
        ["train/patient00003/study2/view1_frontal.jpg", "Male", "41", "Frontal", "AP", "", "", "0.0", "-1.0"],
        ["train/patient00004/study1/view1_frontal.jpg", "Female", "55", "Frontal", "PA", "", "1.0", "", "1.0"],
    ]
    for k, row in enumerate(rows):
        write_image(root / "images" / row[0], seed=k, size=40, mode="L")
    return write_csv(root / "train.csv", header, rows)


def test_chexpert_uncertain_blank_and_no_finding_and_the_lateral_left_out(tmp_path, capsys):
    path = chexpert_csv(tmp_path)
    table = read_table(path, tmp_path / "images")
    assert "left out 1 images of other views" in capsys.readouterr().out
    assert table.findings == ["Cardiomegaly", "Edema", "Pleural Effusion"]  # No Finding is no finding to learn
    by_name = {str(p.relative_to(tmp_path / "images")): row for p, row in zip(table.paths, table.labels)}
    first = by_name["train/patient00001/study1/view1_frontal.jpg"]
    assert first[0] == 1 and np.isnan(first[1]) and np.isnan(first[2])  # -1 ignored, blank unknown
    assert (by_name["train/patient00002/study1/view1_frontal.jpg"] == 0).all()  # No Finding: blanks are absent
    assert table.metadata["patient"][0] == "patient00001" and table.metadata["sex"][0] == "Female"
    zeros = read_table(path, tmp_path / "images", LabelOptions(uncertain="zeros"))
    ones = read_table(path, tmp_path / "images", LabelOptions(uncertain="ones", views=None))
    assert zeros.labels[0, 1] == 0 and ones.labels[0, 1] == 1
    assert len(ones.paths) == 6  # every view


def test_generic_columns_with_patient_and_view_columns(tmp_path):
    rows = []
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
        rows.append([f"{i}.png", f"p{i // 2}", "PA", str(i % 2), "" if i == 3 else "1", "72"])
    path = write_csv(tmp_path / "labels.csv", ["file", "subject", "position", "Effusion", "Nodule", "age"], rows)
    table = read_table(path, tmp_path / "img", LabelOptions(patient_column="subject", view_column="position"))
    assert table.findings == ["Effusion", "Nodule"]  # 'age' holds other values than 1, 0 and blank
    assert np.isnan(table.labels[3, 1]) and table.labels[3, 0] == 1
    assert table.metadata["patient"][:2] == ["p0", "p0"]


def test_columns_read_like_mimic_with_a_patient_column_found_by_name(tmp_path, capsys):
    """Audit 2026-12-06, faults 9 and 10: -1.0, nan and TRUE made a column 'not a finding' with no word, and a
    column named patient_id was not taken as the patient (43 of 100 patients fell into two splits)."""
    rows = []
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
        rows.append([f"{i}.png", f"p{i // 2}", ["1.0", "0.0", "-1.0", "", "nan", "1.0"][i],
                     ["TRUE", "FALSE", "true", "false", "", "TRUE"][i], "note"])
    path = write_csv(tmp_path / "labels.csv", ["path", "patient_id", "Edema", "Pneumonia", "comment"], rows)
    table = read_table(path, tmp_path / "img")
    assert table.findings == ["Edema", "Pneumonia"] and table.metadata["patient"][:3] == ["p0", "p0", "p1"]
    np.testing.assert_array_equal(table.labels[:, 0], [1, 0, np.nan, np.nan, np.nan, 1])
    np.testing.assert_array_equal(table.labels[:, 1], [1, 0, 1, 0, np.nan, 1])
    assert "'comment' not read as findings" in capsys.readouterr().err
    ones = read_table(path, tmp_path / "img", LabelOptions(uncertain="ones"))  # --uncertain applies here too
    assert ones.labels[2, 0] == 1
    write_csv(tmp_path / "anonymous.csv", ["path", "Edema"], [[r[0], r[2]] for r in rows])
    read_table(tmp_path / "anonymous.csv", tmp_path / "img")
    assert "no patient column" in capsys.readouterr().err


def test_a_windows_1252_csv_reads_and_repeated_or_escaping_columns_are_refused(tmp_path, capsys):
    """Audit 2026-12-06, faults 7, 8 and 11: a Windows-1252 CSV trained and then crashed while plotting; a second
    column of the same name silently replaced the first's labels; paths escaped --images (/etc/hostname became
    an image row)."""
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
    text = "path,patient_id,\u00c9panchement\n" + "".join(f"{i}.png,p{i},{i % 2}\n" for i in range(4))
    (tmp_path / "excel.csv").write_bytes(text.encode("cp1252"))
    table = read_table(tmp_path / "excel.csv", tmp_path / "img")
    assert table.findings == ["\u00c9panchement"] and "Windows-1252" in capsys.readouterr().err
    (tmp_path / "twice.csv").write_text("path,patient_id,Edema,Edema\n0.png,p0,1,0\n")
    with pytest.raises(UserError, match=r"twice\.csv: the column 'Edema' appears more than once"):
        read_table(tmp_path / "twice.csv", tmp_path / "img")
    for escaping in ("/etc/hostname", "../outside.png"):
        write_image(tmp_path / "outside.png")
        (tmp_path / "escape.csv").write_text(f"path,patient_id,Edema\n0.png,p0,1\n{escaping},p1,0\n")
        with pytest.raises(UserError, match=r"escape\.csv line 3: the image path .* leads outside --images"):
            read_table(tmp_path / "escape.csv", tmp_path / "img")


# --- bad input: one line naming the CSV, the line and the column; nothing changed ---------------------------

@needs_nih
@pytest.mark.parametrize("edit, words", [
    (lambda lines: [lines[0].replace("Finding Labels", "Findings"), *lines[1:]], ["no column 'Finding Labels'"]),
    (lambda lines: [*lines[:3], lines[3].replace("No Finding", ""), *lines[4:]], ["line 4", "'Finding Labels'"]),
    (lambda lines: [*lines[:2], lines[2].replace("00000100_000.png", "missing.png"), *lines[3:]],
     ["line 3", "missing.png does not exist", "--images"]),
    (lambda lines: [*lines, lines[1].replace("Cardiomegaly", "Edema")], ["two different sets of labels"]),
])
def test_bad_nih_csvs_are_refused_in_one_line(tmp_path, capsys, edit, words):
    path = write_lines(tmp_path / "labels.csv", edit(nih_rows(20)))
    before = fingerprint(tmp_path)
    line = one_line_error(["train", "--labels", str(path), "--images", str(NIH_IMAGES),
                           "--output-dir", str(tmp_path / "out"), *TINY], capsys)
    assert str(path) in line and all(w in line for w in words), line
    assert {p: d for p, d in fingerprint(tmp_path).items() if "out" not in p.parts} == before


def test_bad_chexpert_values_and_findings_are_refused_in_one_line(tmp_path, capsys):
    path = chexpert_csv(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().replace("1.0,-1.0,\n", "2,-1.0,\n", 1))

    def train(csv_path, *options):
        return ["train", "--labels", str(csv_path), "--images", str(tmp_path / "images"),
                "--output-dir", str(tmp_path / "out"), *options, *TINY]

    line = one_line_error(train(bad), capsys)
    assert "line 2" in line and "'Cardiomegaly'" in line and "'2' is not 1, 0, -1 or blank" in line
    assert "no finding 'Fracture'" in one_line_error(train(path, "--findings", "Fracture"), capsys)
    table = read_table(path, tmp_path / "images")
    table.labels[:, 1] = np.where(table.labels[:, 1] == 1, 0, table.labels[:, 1])
    with pytest.raises(UserError, match="no image is positive for Edema"):
        select_findings(path, table, ["Edema"])


def test_labels_need_images_and_formats_are_checked(tmp_path, capsys):
    path = chexpert_csv(tmp_path)
    assert "--labels needs --images" in one_line_error(["train", "--labels", str(path), *TINY], capsys)
    line = one_line_error(["train", "--labels", str(path), "--images", str(tmp_path / "images"),
                           "--label-format", "nih", *TINY], capsys)
    assert "no column 'Image Index'" in line


# --- splits ------------------------------------------------------------------------------------------------

def patient_table(tmp_path, patients=60, per_patient=3, seed=0):
    """A generic CSV: `patients` x `per_patient` images, three findings of different prevalence."""
    rng = np.random.default_rng(seed)
    rows = []
    image = write_image(tmp_path / "img" / "x.png")
    for p in range(patients):
        findings = [int(rng.random() < q) for q in (0.5, 0.2, 0.1)]
        for k in range(per_patient):
            name = f"p{p}_{k}.png"
            (tmp_path / "img" / name).write_bytes(image.read_bytes())
            rows.append([name, f"P{p}", *findings])
    return read_table(write_csv(tmp_path / "labels.csv", ["path", "patient", "A", "B", "C"], rows), tmp_path / "img",
                      LabelOptions(patient_column="patient"))


def test_splits_are_patient_disjoint_stratified_and_seeded(tmp_path):
    table = patient_table(tmp_path, patients=200)
    splits = stratified_patient_splits(table, {"val": 0.15, "test": 0.15}, seed=42)
    patients = {name: {table.metadata["patient"][r] for r in rows} for name, rows in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert sum(len(r) for r in splits.values()) == len(table.paths)
    total = table.labels.sum(axis=0)
    for name, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        got = table.labels[splits[name]].sum(axis=0) / total
        assert np.all(np.abs(got - share) <= 0.05), (name, got)  # every finding near its share in every split
    again = stratified_patient_splits(table, {"val": 0.15, "test": 0.15}, seed=42)
    other = stratified_patient_splits(table, {"val": 0.15, "test": 0.15}, seed=7)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    assert not all(np.array_equal(splits[s], other[s]) for s in splits)


def test_an_official_test_list_is_the_test_split(tmp_path):
    patient_table(tmp_path, patients=30)  # writes labels.csv and img/
    listed = [f"p{p}_0.png" for p in range(0, 30, 5)]
    (tmp_path / "test_list.txt").write_text("\n".join(listed) + "\n")
    config = Config(labels=tmp_path / "labels.csv", images=tmp_path / "img", patient_column="patient",
                    findings=["A", "B"])
    dataset = read_labelled_table(config.labels, config.images, config.label_options(), config,
                                  tmp_path / "test_list.txt")
    test_names = {dataset.paths[r].name for r in dataset.splits["test"]}
    # every image of a listed image's patient goes to test with it, and nothing else does
    assert test_names == {f"p{p}_{k}.png" for p in range(0, 30, 5) for k in range(3)}


# --- masking, operating points, metrics --------------------------------------------------------------------

def test_an_unknown_label_changes_neither_the_loss_nor_the_metrics():
    import keras

    from cxr.model.networks import MaskedBinaryCrossentropy

    loss = MaskedBinaryCrossentropy()
    p = np.array([[0.8, 0.3, 0.6]], np.float32)
    with_unknown = float(loss(np.array([[1.0, np.nan, 0.0]], np.float32), p))
    known_only = float(keras.losses.BinaryCrossentropy()(np.array([[1.0, 0.0]]), p[:, [0, 2]]))
    assert with_unknown == pytest.approx(known_only, rel=1e-5)
    for flipped in (0.99, 0.01):  # whatever the model says where the label is unknown
        assert float(loss(np.array([[1.0, np.nan, 0.0]], np.float32), np.array([[0.8, flipped, 0.6]], np.float32))) \
            == pytest.approx(with_unknown, rel=1e-5)
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 2)) < 0.4).astype(np.float32)
    scores = rng.random((40, 2))
    masked = labels.copy()
    masked[:10, 0] = np.nan
    called = (scores >= 0.5).astype(int)
    got = finding_metrics(masked, scores, called, ["A", "B"])
    dropped = finding_metrics(labels[10:, :1], scores[10:, :1], called[10:, :1], ["A"])
    assert got["A auc_roc"] == pytest.approx(dropped["A auc_roc"])
    assert got["A sensitivity"] == pytest.approx(dropped["A sensitivity"])
    assert got["B auc_roc"] == finding_metrics(labels[:, 1:], scores[:, 1:], called[:, 1:], ["B"])["B auc_roc"]


def test_each_finding_gets_its_own_operating_point_and_a_one_class_finding_keeps_the_old_one():
    rng = np.random.default_rng(1)
    labels = (rng.random((200, 3)) < [0.5, 0.2, 0.0]).astype(np.float32)
    scores = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.7, 0.01, 0.99)
    labels[:50, 0] = np.nan
    assert np.sum(labels[:, 1] == 1) >= 20  # enough positives for the sensitivity target
    previous = {"findings": {"C": {"temperature": 2.0, "threshold": 0.7, "method": "youden"}}}
    point = fit_finding_points(labels, scores, ["A", "B", "C"], target_sensitivity=0.9, keep=previous)
    for k, name in enumerate(("A", "B")):
        found = point["findings"][name]
        known = ~np.isnan(labels[:, k])
        from cxr.model.inference import apply_finding_temperatures

        calibrated = apply_finding_temperatures(scores[known, k], found["temperature"])
        sensitivity = np.mean(calibrated[labels[known, k] == 1] >= found["threshold"])
        assert sensitivity >= 0.9 and found["val_sensitivity"] == pytest.approx(sensitivity)
        assert found["val_positives"] == int(np.sum(labels[known, k] == 1))
    assert point["findings"]["A"]["threshold"] != point["findings"]["B"]["threshold"]
    assert point["findings"]["C"]["threshold"] == 0.7 and point["findings"]["C"]["temperature"] == 2.0


def test_a_finding_with_few_positives_calls_as_many_images_as_are_positive_and_says_so(capsys):
    """Issue 46: thresholds fitted for a 0.9 sensitivity on 2-9 positives called almost every image."""
    rng = np.random.default_rng(2)
    labels = np.zeros((300, 2), np.float32)
    labels[rng.choice(300, 40, replace=False), 0] = 1
    labels[rng.choice(300, 3, replace=False), 1] = 1
    scores = np.clip(labels * 0.25 + rng.random((300, 2)) * 0.75, 0.01, 0.99)
    point = fit_finding_points(labels, scores, ["Effusion", "Hernia"], target_sensitivity=0.9)
    many, few = point["findings"]["Effusion"], point["findings"]["Hernia"]
    assert many["method"] == "sensitivity >= 0.9" and many["val_sensitivity"] >= 0.9
    assert few["method"] == "prevalence: 3 validation positives, too few for sensitivity >= 0.9"
    from cxr.model.inference import apply_finding_temperatures

    called = apply_finding_temperatures(scores[:, 1], few["temperature"]) >= few["threshold"]
    assert called.sum() == 3 and few["val_specificity"] >= 0.98  # not 0.02
    assert "fewer than 20 validation positives for Hernia (3)" in capsys.readouterr().err


def test_patient_bootstrap_draws_whole_patients():
    from cxr.evaluate.metrics import patient_resamples

    patients = np.array(["a", "a", "a", "b", "c", "c"])
    for rows in patient_resamples(patients, 20, seed=0):
        drawn = patients[rows]
        for name, size in (("a", 3), ("b", 1), ("c", 2)):
            assert np.sum(drawn == name) % size == 0  # a patient comes with all its images or not at all
    labels = np.array([[1], [0], [1], [0], [1], [0]], np.float32)
    scores = np.array([[0.9], [0.2], [0.8], [0.3], [0.6], [0.4]])
    intervals = confidence_intervals(lambda r: finding_metrics(labels[r], scores[r], scores[r] >= 0.5, ["A"]),
                                     labels, 50, 0, patients=patients)
    assert intervals["A auc_roc"][0] <= intervals["A auc_roc"][1]


# --- a tiny multi-label model through every command ---------------------------------------------------------

def test_training_writes_a_multi_label_model_and_its_reports(tiny_multilabel):
    outputs, _ = tiny_multilabel
    info = json.loads((outputs / "models/class_names.json").read_text())
    summary = json.loads((outputs / "reports/summary.json").read_text())
    findings = info["class_names"]
    assert info["multi_label"] is True and set(info["findings"]) == set(findings) and len(findings) >= 3
    assert all(0 < p["threshold"] < 1 and p["temperature"] > 0 for p in info["findings"].values())
    metrics = summary["metrics"]
    assert set(metrics["per_finding"]) == set(findings)
    assert {"auc_roc", "auc_pr", "sensitivity", "specificity", "ppv", "npv", "prevalence", "n_positive"} <= set(
        metrics["per_finding"][findings[0]])
    auc = [v["auc_roc"] for v in metrics["per_finding"].values() if v["auc_roc"] is not None]
    assert metrics["mean_auc"] == pytest.approx(np.mean(auc))
    assert "mean_auc" in summary["confidence_intervals"]
    assert any(f"{f} auc_roc" in summary["confidence_intervals"] for f in findings)
    page = (outputs / "reports/report.html").read_text()
    assert "Per finding" in page and all(f in page for f in findings)
    assert (outputs / "plots/roc.png").is_file() and (outputs / "plots/gradcam_gallery.png").is_file()
    with (outputs / "reports/splits.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"split", "path", *findings} and {r["split"] for r in rows} == {"train", "val", "test"}


def test_the_saved_model_loads_in_stock_keras(tiny_multilabel):
    outputs, _ = tiny_multilabel
    code = ("import keras, numpy as np; m = keras.models.load_model(%r); "
            "p = m.predict(np.zeros((1, 32, 32, 3)), verbose=0); print(p.shape, float(p.min()) >= 0)"
            % str(outputs / "models/model.h5"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    findings = json.loads((outputs / "models/class_names.json").read_text())["class_names"]
    assert f"(1, {len(findings)}) True" in result.stdout


@needs_nih
def test_plain_keras_training_saves_a_file_stock_keras_loads(tmp_path):
    """Without the feature cache and with one view, the saved model is the very one Keras compiled with the
    masked loss: the file must still load in a Python that never imported cxr."""
    train_csv = write_lines(tmp_path / "train.csv", nih_rows(60))
    assert main(["train", "--labels", str(train_csv), "--images", str(NIH_IMAGES), "--output-dir",
                 str(tmp_path / "out"), "--no-feature-cache", "--test-time-scales", "1", "--class-weight",
                 "balanced", *TINY]) == 0
    code = "import keras; m = keras.models.load_model(%r); print(m.layers[-1].activation.__name__)" % str(
        tmp_path / "out/models/model.h5")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "sigmoid", result.stderr[-2000:]


def test_predict_explain_evaluate_calibrate_and_export(tiny_multilabel, tmp_path, capsys):
    outputs, other_csv = tiny_multilabel
    model = str(outputs / "models/model.h5")
    info = json.loads((outputs / "models/class_names.json").read_text())
    findings = info["class_names"]
    images = sorted(NIH_IMAGES.iterdir())[:3]
    assert main(["predict", *map(str, images), "--model", model, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    for record in records:
        p = {f: record[f"p_{f}"] for f in findings}
        called = [f for f in findings if p[f] >= info["findings"][f]["threshold"]]
        assert sorted(record["positive_findings"]) == sorted(called)
        assert record["label"] == ("|".join(record["positive_findings"]) or "none")
        assert isinstance(record["in_distribution"], bool)  # a multi-label model has its population check too
    assert (outputs / "models/population.npz").is_file()
    assert main(["predict", str(images[0]), "--model", model, "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert header == ["path", "label", "in_distribution", "population_score", "population_percentile", "warnings",
                      "rule", *(f"p_{f}" for f in findings), *(f"threshold_{f}" for f in findings)]

    assert main(["explain", str(images[0]), "--model", model, "--output-dir", str(tmp_path / "explain"),
                 "--class", findings[1]]) == 0
    assert (tmp_path / "explain" / f"{images[0].stem}.gradcam.png").is_file()
    capsys.readouterr()

    assert main(["evaluate", "--model", model, "--labels", str(other_csv), "--images", str(NIH_IMAGES),
                 "--output-dir", str(tmp_path / "evaluation"), "--bootstrap", "20"]) == 0
    evaluated = json.loads((tmp_path / "evaluation/reports/summary.json").read_text())
    assert evaluated["metrics"]["n_images"] == 30 and set(evaluated["metrics"]["per_finding"]) == set(findings)
    assert "mean AUC" in capsys.readouterr().out
    line = one_line_error(["evaluate", "--model", model, "--data-dir", str(tmp_path)], capsys)
    assert "multi-label model" in line and "--labels" in line

    assert main(["calibrate", "--model", model, "--labels", str(other_csv), "--images", str(NIH_IMAGES),
                 "--output-dir", str(tmp_path / "site"), "--bootstrap", "20"]) == 0
    capsys.readouterr()
    refitted = json.loads((tmp_path / "site/models/class_names.json").read_text())
    assert refitted["multi_label"] and refitted["findings"] != info["findings"]
    assert "calibration sample" in refitted["fitted_on"]["description"]
    assert json.loads((outputs / "models/class_names.json").read_text()) == info  # the original is untouched

    assert main(["evaluate", "--model", model, "--splits", str(outputs / "reports/splits.csv"), "--split", "test",
                 "--output-dir", str(tmp_path / "retest"), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    retest = json.loads((tmp_path / "retest/reports/summary.json").read_text())["metrics"]
    trained = json.loads((outputs / "reports/summary.json").read_text())["metrics"]
    assert retest["mean_auc"] == pytest.approx(trained["mean_auc"], abs=1e-6)  # the run's own test split again

    assert main(["export", "--model", model, "--format", "tflite", "--output-dir", str(tmp_path / "export")]) == 0
    card = json.loads((tmp_path / "export/model-card.json").read_text())
    assert card["outputs"]["activation"] == "sigmoid" and set(card["decision_rule"]) == set(findings)
    covered = card["training"]["subgroups"]  # which subgroups the test split covered, and the gaps
    assert {"sex", "age", "view"} <= set(covered) and "gaps" in covered["sex"]
    assert card["training"]["metrics"]["mean_auc"] == json.loads(
        (outputs / "reports/summary.json").read_text())["metrics"]["mean_auc"]


def test_init_from_copies_another_models_backbone_and_leaves_the_head_new(tiny_run, tmp_path):
    import keras

    from cxr.model.networks import backbone_layers, build_classifier, init_from

    source = keras.models.load_model(tiny_run / "models/model.h5", compile=False)  # two classes, test-time scales
    target = build_classifier("test-efficientnet", 5, "none", 48, multi_label=True)
    head_before = target.get_layer("predictions").get_weights()
    copied = init_from(target, tiny_run / "models/model.h5")
    assert copied > 50
    conv = next(layer for layer in backbone_layers(target) if isinstance(layer, keras.layers.Conv2D))
    source_conv = next(layer for m in [source, *[l for l in source.layers if isinstance(l, keras.Model)]]
                       for layer in m.layers if layer.name == conv.name)
    assert np.array_equal(conv.get_weights()[0], source_conv.get_weights()[0])
    assert all(np.array_equal(a, b) for a, b in zip(target.get_layer("predictions").get_weights(), head_before))
    other = build_classifier("efficientnetb0", 2, "none", 32)
    other.save(tmp_path / "b0.h5")
    with pytest.raises(UserError, match="layers with weights fit it"):
        init_from(build_classifier("efficientnet-lite0", 2, "none", 32), tmp_path / "b0.h5")


def test_serve_answers_with_every_finding_and_the_page_lists_them(tiny_multilabel, tmp_path):
    from tests.test_serve import Server

    outputs, _ = tiny_multilabel
    info = json.loads((outputs / "models/class_names.json").read_text())
    server = Server(outputs / "models/model.h5")
    try:
        image = sorted(NIH_IMAGES.iterdir())[0]
        answer = requests.post(server.url + "/v1/predict", params={"explain": "true"}, timeout=120,
                               files=[("files", (image.name, image.read_bytes(), "image/png"))])
        assert answer.status_code == 200, answer.text
        record = answer.json()["predictions"][0]
        assert [f["name"] for f in record["findings"]] == sorted(
            info["class_names"], key=lambda f: -record["probabilities"][f])
        for finding in record["findings"]:
            assert finding["threshold"] == info["findings"][finding["name"]]["threshold"]
            assert finding["positive"] == (finding["probability"] >= finding["threshold"])
        assert record["overlay"].startswith("data:image/png;base64,")
        card = requests.get(server.url + "/v1/model", timeout=30).json()
        assert card["outputs"]["activation"] == "sigmoid"
        shown = page_findings(server.url, image, tmp_path)
        assert shown == [(f["name"], f["probability"]) for f in record["findings"]]
    finally:
        server.stop()


def page_findings(url, image, tmp_path):
    """[(finding, probability)] as the page in headless Chromium shows them for `image`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import headless_browser

    browser = headless_browser(tmp_path)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(
            lambda b: "Findings" in b.find_element(By.ID, "card").get_attribute("textContent"))
        browser.find_element(By.ID, "files").send_keys(str(image))
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .findings li"))
        browser.save_screenshot(str(tmp_path / "page.png"))
        return [(li.get_attribute("data-finding"), float(li.get_attribute("data-probability")))
                for li in browser.find_elements(By.CSS_SELECTOR, ".result .findings li")]
    finally:
        browser.quit()


def test_a_labels_csv_has_its_own_defaults_and_class_folders_keep_the_seeds():
    table = Config(labels=Path("labels.csv"), images=Path("images"))
    assert (table.backbone, table.lr, table.augment, table.monitor) == ("efficientnet-lite0", 1e-2, "seed", "val_auc")
    folders = Config()  # the offline default backbone; the seed's learning rate and monitor
    assert (folders.backbone, folders.lr, folders.augment, folders.monitor) == (
        "efficientnet-lite0", 1e-3, "site-aspect", "val_accuracy")
    seed = Config(backbone="efficientnetb0")  # the seed's recipe, by name
    assert (seed.lr, seed.augment, seed.finetune_epochs) == (1e-3, "seed", seed.epochs)
    assert Config(backbone="efficientnet-lite0").augment == "site-aspect"
    with pytest.raises(UserError, match="val_accuracy is for class folders"):
        Config(labels=Path("labels.csv"), images=Path("images"), monitor="val_accuracy").validate()


def test_evaluating_on_the_training_csv_warns_and_counts_only_findings_with_an_auc(tiny_multilabel, capsys):
    """Audit 2026-12-06, fault 16: `cxr evaluate --labels` on the model's own training CSV printed 'Test: mean
    AUC' with no warning although most images were used for training or validation, and 'over 3 findings' when
    only one had an AUC."""
    out, _ = tiny_multilabel
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "models/model.h5"), "--labels", str(out.parent / "train.csv"),
                 "--images", str(NIH_IMAGES), "--output-dir", str(out.parent / "again"), "--bootstrap", "0"]) == 0
    stdout, err = capsys.readouterr()
    summary = json.loads((out.parent / "again/reports/summary.json").read_text())
    with_auc = sum(v["status"] == "ok" for v in summary["metrics"]["per_finding"].values())
    used = sum(1 for row in csv.DictReader(open(out / "reports/splits.csv")) if row["split"] in ("train", "val"))
    assert f"{used} of {summary['metrics']['n_images']} images were used to train or validate this model" in err
    if with_auc < len(summary["metrics"]["per_finding"]):
        assert f"over the {with_auc} of {len(summary['metrics']['per_finding'])} findings with both classes" in stdout
    else:
        assert f"over {with_auc} findings" in stdout
