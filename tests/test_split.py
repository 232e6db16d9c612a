import hashlib
import shutil
import threading
from pathlib import Path

import pytest

from cxr.training.config import Config
from cxr.data.split import assign_splits, group_key, make_groups, prepare_splits
from cxr.errors import UserError
from tests.conftest import write_image


def make_raw(root, per_class=40, images_per_patient=2):
    """raw/<Class>/ with Kermany-style names: several images per patient."""
    paths = []
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(per_class):
            patient = i // images_per_patient
            filename = (f"IM-{patient:04d}-{i:04d}.jpeg" if name == "NORMAL"
                        else f"person{patient}_bacteria_{i}.jpeg")
            paths.append(write_image(root / "raw" / name / filename, seed=c * 1000 + i))
    return paths


def snapshot(folder):
    return {p: (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def patients(files):
    key = group_key(None)
    return {key(p) for p in files}


def test_group_key_reads_kermany_patient_ids():
    key = group_key(None)
    assert key("person1234_bacteria_3141.jpeg") == key("person1234_virus_2100.jpeg") == "person1234"
    assert key("IM-0115-0001.jpeg") == "IM-0115"
    assert key("NORMAL2-IM-0246-0001-0002.jpeg") == "NORMAL2-IM-0246"
    assert key("scan_001.png") is None
    assert group_key(r"^(\w+?)_")("patientA_1.png") == "patientA"


def test_raw_split_is_70_15_15_per_class_and_leaves_raw_untouched(tmp_path):
    make_raw(tmp_path, per_class=40)
    before = snapshot(tmp_path / "raw")
    splits = prepare_splits(Config(data_dir=tmp_path))
    assert snapshot(tmp_path / "raw") == before
    counts = splits.counts()
    for name in ("NORMAL", "PNEUMONIA"):
        assert counts["train"][name] == 28 and counts["val"][name] == 6 and counts["test"][name] == 6
    # copied, not moved, into the split folders
    assert len(list((tmp_path / "train").rglob("*.jpeg"))) == 56
    assert (tmp_path / "split.json").is_file()


def test_no_patient_in_two_splits(tmp_path):
    make_raw(tmp_path, per_class=60, images_per_patient=3)
    splits = prepare_splits(Config(data_dir=tmp_path))
    train, val, test = (patients(splits.files(s)) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)


def test_duplicates_never_cross_splits(tmp_path):
    paths = make_raw(tmp_path, per_class=40, images_per_patient=1)
    # byte-identical copies under unrelated names
    for i in range(0, 40, 4):
        shutil.copyfile(paths[i], tmp_path / "raw" / "NORMAL" / f"copy_{i}.jpeg")
    splits = prepare_splits(Config(data_dir=tmp_path))
    digest = {s: {hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in splits.files(s)} for s in splits.splits}
    assert not (digest["train"] & digest["val"]) and not (digest["train"] & digest["test"])
    assert not (digest["val"] & digest["test"])


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    paths = make_raw(tmp_path / "a", per_class=40, images_per_patient=1)
    labels = [0 if "NORMAL" in str(p) else 1 for p in paths]
    fractions = {"val": 0.15, "test": 0.15}
    first = assign_splits(paths, labels, fractions, seed=42)
    assert first == assign_splits(paths, labels, fractions, seed=42)
    assert first != assign_splits(paths, labels, fractions, seed=7)


def test_existing_train_folder_is_not_split_again_and_says_so(tmp_path, capsys):
    make_raw(tmp_path, per_class=40)
    prepare_splits(Config(data_dir=tmp_path))
    before = snapshot(tmp_path / "train")
    capsys.readouterr()
    again = prepare_splits(Config(data_dir=tmp_path, seed=1))
    assert snapshot(tmp_path / "train") == before
    assert again.counts()["train"]["NORMAL"] == 28
    # reused, not silently: another seed does not make another split, and the warning says how to get one
    said = capsys.readouterr()
    assert "made earlier (seed 42" in said.err and "--seed 1 does not change it" in said.err
    assert "delete train/, val/ and test/ to split again" in said.err
    prepare_splits(Config(data_dir=tmp_path))
    assert "Using the split of" in capsys.readouterr().out


def test_class_folders_given_directly_are_trained_on_with_val_and_test_carved(tmp_path, capsys):
    make_raw(tmp_path, per_class=40)
    flat = tmp_path / "raw"  # NORMAL/ and PNEUMONIA/ directly inside, as cxr evaluate takes them
    before = snapshot(flat)
    splits = prepare_splits(Config(data_dir=flat))
    assert snapshot(flat) == before and sorted(p.name for p in flat.iterdir()) == ["NORMAL", "PNEUMONIA"]
    counts = splits.counts()
    assert counts["train"]["NORMAL"] == 28 and counts["val"]["NORMAL"] == 6 and counts["test"]["NORMAL"] == 6
    train, val, test = (patients(splits.files(s)) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert "Using the class folders of" in capsys.readouterr().out


def test_tiny_val_folder_is_replaced_by_val_carved_from_train(tmp_path, capsys):
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(40):
            write_image(tmp_path / "train" / name / f"person{c}{i}_x_{i}.jpeg", seed=c * 100 + i)
        for i in range(4):
            write_image(tmp_path / "val" / name / f"v{i}.jpeg", seed=5000 + c * 10 + i)
    splits = prepare_splits(Config(data_dir=tmp_path))
    assert "too few to early-stop on" in capsys.readouterr().err
    assert all(Path(p).parent.parent.name == "train" for p in splits.files("val"))
    assert splits.counts()["val"] == {"NORMAL": 6, "PNEUMONIA": 6}
    # no test folder: the test set is carved from train too, disjoint from train and val
    assert not set(splits.files("test")) & set(splits.files("train"))
    kept = prepare_splits(Config(data_dir=tmp_path, val_from_train=False))
    assert len(kept.files("val")) == 8


def test_make_groups_joins_patients_and_copies(tmp_path):
    a = write_image(tmp_path / "person1_virus_1.jpeg", seed=1)
    b = write_image(tmp_path / "person1_bacteria_2.jpeg", seed=2)
    c = write_image(tmp_path / "x.jpeg", seed=3)
    d = tmp_path / "y.jpeg"
    shutil.copyfile(c, d)
    e = write_image(tmp_path / "z.jpeg", seed=4)
    groups = sorted(sorted(g) for g in make_groups([a, b, c, d, e]))
    assert groups == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "no such folder"),
    (lambda root: root.mkdir(), "found neither train"),
    (lambda root: (root / "empty").mkdir(parents=True), "found neither train"),
    (lambda root: write_image(root / "raw" / "NORMAL" / "a.png"), "only one class"),
    (lambda root: (write_image(root / "raw" / "NORMAL" / "a.png"), (root / "raw" / "PNEUMONIA").mkdir()),
     "PNEUMONIA: class folder has no images"),
])
def test_bad_data_folders_raise_user_errors_naming_the_path(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(UserError, match=message):
        prepare_splits(Config(data_dir=root))


def test_symlinked_folders_are_followed_once_and_hidden_folders_left_out(tmp_path):
    from cxr.data.split import list_images

    for i in range(3):
        write_image(tmp_path / "elsewhere" / f"linked{i}.png", seed=i)
    write_image(tmp_path / "data" / "NORMAL" / "a.png")
    write_image(tmp_path / "data" / "NORMAL" / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "data" / "NORMAL" / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "elsewhere")  # a link loop ends
    names = sorted(p.name for p in list_images(tmp_path / "data", ["NORMAL"])["NORMAL"])
    assert names == ["a.png", "linked0.png", "linked1.png", "linked2.png"]


def test_a_process_that_may_not_split_waits_for_another_to_finish_the_split_and_reads_the_same(tmp_path):
    make_raw(tmp_path, per_class=20)
    with pytest.raises(UserError, match="did not split raw/ within"):
        prepare_splits(Config(data_dir=tmp_path), split_wait=1)
    assert not (tmp_path / "train").exists()  # the waiting process wrote nothing
    splitter = threading.Timer(1.5, lambda: prepare_splits(Config(data_dir=tmp_path)))
    splitter.start()
    waited = prepare_splits(Config(data_dir=tmp_path), split_wait=30)
    splitter.join()
    assert waited.counts() == prepare_splits(Config(data_dir=tmp_path)).counts()
    assert sorted(map(str, waited.paths)) == sorted(map(str, prepare_splits(Config(data_dir=tmp_path)).paths))
