import os

import numpy as np
import pytest
from PIL import Image

from cxr.training.config import Config
from cxr.data.decode import UnreadableImage, decode_image
from cxr.data.pipeline import AUGMENTATIONS, DiskArray, decode_all, make_dataset, write_array
from cxr.data.split import prepare_splits, read_labelled_folder
from cxr.errors import UserError
from tests.conftest import write_image


def test_every_supported_format_loads_as_rgb_uint8(tmp_path):
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65535, (50, 30), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    write_image(tmp_path / "grey.jpg", mode="L")
    write_image(tmp_path / "rgb.bmp")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").convert("P").save(tmp_path / "palette.png")
    for path in tmp_path.iterdir():
        image = decode_image(path, 32)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8, path.name
    # 16-bit values are scaled to 0-255, not clipped
    assert decode_image(tmp_path / "grey16.png", 32).max() > 200


def test_decode_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    paths = [write_image(tmp_path / "img" / f"{i}.png", seed=i) for i in range(3)]
    first, bad = decode_all(paths, 16, tmp_path / "cache")
    assert not bad and first.shape == (3, 16, 16, 3)
    assert np.array_equal(first[1], decode_image(paths[1], 16))
    cache_files = sorted((tmp_path / "cache").iterdir())
    again, _ = decode_all(paths, 16, tmp_path / "cache")
    assert sorted((tmp_path / "cache").iterdir()) == cache_files  # reused, not rewritten
    write_image(paths[1], seed=99)
    os.utime(paths[1], ns=(1, 1))  # a different mtime, as an edit would give
    changed, _ = decode_all(paths, 16, tmp_path / "cache")
    assert np.array_equal(changed[1], decode_image(paths[1], 16))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # the stale array is gone


def test_corrupt_images_are_skipped_with_a_warning_or_refused_when_strict(tmp_path, capsys):
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(10):
            write_image(tmp_path / "data" / "raw" / name / f"{name}{i}.png", seed=c * 50 + i)
    bad = tmp_path / "data" / "raw" / "NORMAL" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    dataset = prepare_splits(Config(data_dir=tmp_path / "data"))
    dataset.decode(16, tmp_path / "cache")
    assert "broken.png" in capsys.readouterr().err
    assert sum(len(rows) for rows in dataset.splits.values()) == 20
    assert sum(n for per_class in dataset.counts().values() for n in per_class.values()) == 20
    with pytest.raises(UserError, match="broken.png"):
        prepare_splits(Config(data_dir=tmp_path / "data")).decode(16, tmp_path / "cache", strict=True)
    with pytest.raises(UnreadableImage, match="broken.png"):
        decode_image(bad, 16)


def test_dataset_yields_one_hot_batches_and_augments_only_when_asked(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", seed=i, size=32) for i in range(6)]
    images, _ = decode_all(paths, 32, tmp_path / "cache")
    rows, labels = np.arange(6), np.array([0, 1, 0, 1, 1, 0])
    plain = make_dataset(images, rows, np.eye(2)[labels], batch_size=4)
    x, y = next(iter(plain))
    assert x.shape == (4, 32, 32, 3) and x.dtype.name == "float32"
    np.testing.assert_array_equal(y.numpy(), np.eye(2)[labels[:4]])
    np.testing.assert_array_equal(x.numpy(), images[:4].astype("float32"))  # eval data is the image itself
    for kind in AUGMENTATIONS:
        augmented = make_dataset(images, rows, np.eye(2)[labels], batch_size=6, augment=kind, seed=1)
        xa, ya = next(iter(augmented))
        np.testing.assert_array_equal(ya.numpy(), np.eye(2)[labels])
        assert not np.allclose(xa.numpy(), images[:].astype("float32")), kind
        assert 0 <= xa.numpy().min() and xa.numpy().max() <= 255, kind


def test_disk_array_reads_the_rows_asked_for_and_refuses_a_short_write(tmp_path):
    data = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    array = write_array(tmp_path / "a.npy", data.shape, np.float32, [data[:2], data[2:]])
    assert array.shape == data.shape and array.dtype == np.float32 and len(array) == 5
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), data)  # a plain .npy file
    np.testing.assert_array_equal(array[3], data[3])
    np.testing.assert_array_equal(array[-1], data[-1])
    np.testing.assert_array_equal(array[1:4], data[1:4])
    np.testing.assert_array_equal(array[np.array([4, 0, 4])], data[[4, 0, 4]])
    np.save(tmp_path / "b.npy", data)  # numpy's own (version 1.0) files read the same way
    np.testing.assert_array_equal(DiskArray(tmp_path / "b.npy")[[2]], data[[2]])
    with pytest.raises(ValueError, match="4 rows written, 5 expected"):
        write_array(tmp_path / "c.npy", data.shape, np.float32, [data[:4]])


def test_dataset_holds_a_labels_matrix_metadata_and_splits_as_rows(tmp_path):
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(10):
            write_image(tmp_path / "data" / "raw" / name / f"person{c}{i // 2}_x_{i}.png", seed=c * 50 + i)
    dataset = prepare_splits(Config(data_dir=tmp_path / "data"))
    n = len(dataset.paths)
    assert n == 20 and dataset.labels.shape == (n, 2) and dataset.labels.dtype == np.float32
    np.testing.assert_array_equal(dataset.labels.sum(axis=1), np.ones(n))  # single-label: one 1 per row
    assert [dataset.class_names[t] for t in dataset.targets] == [p.parent.name for p in dataset.paths]
    assert dataset.metadata["patient"] == [p.name.split("_")[0] for p in dataset.paths]
    rows = np.concatenate(list(dataset.splits.values()))
    assert sorted(rows) == list(range(n))  # every image in exactly one split
    rows, y = dataset.split("test")
    assert dataset.files("test") == [dataset.paths[r] for r in rows] and list(y) == list(dataset.targets[rows])


def test_a_labelled_folder_reads_with_the_models_class_names(tmp_path, capsys):
    write_image(tmp_path / "site" / "PNEUMONIA" / "a.png")
    write_image(tmp_path / "site" / "PNEUMONIA" / "b.png", seed=1)
    dataset = read_labelled_folder(tmp_path / "site", ["NORMAL", "PNEUMONIA", "COVID"])
    assert "no folder for class NORMAL, COVID" in capsys.readouterr().err
    assert dataset.labels.shape == (2, 3) and list(dataset.targets) == [1, 1]
    assert dataset.counts() == {"evaluated": {"NORMAL": 0, "PNEUMONIA": 2, "COVID": 0}}
    with pytest.raises(UserError, match="OTHER"):
        write_image(tmp_path / "site" / "OTHER" / "c.png")
        read_labelled_folder(tmp_path / "site", ["NORMAL", "PNEUMONIA"])


def test_image_warnings_flag_what_is_not_a_grey_xray_of_the_models_size(tmp_path):
    from cxr.data.decode import decode, image_warnings
    from tests.conftest import SAMPLE

    xray = sorted((SAMPLE / "NORMAL").iterdir())[0]
    assert image_warnings(decode(xray, 224), 224) == []
    assert any("very small" in w for w in image_warnings(decode(xray, 224), 512))
    with Image.open(xray) as img:
        grey = np.asarray(img.convert("L")).astype(float)
    washed_out = tmp_path / "washed.png"
    Image.fromarray(np.uint8(100 + grey / 255 * 40)).save(washed_out)
    assert [w for w in image_warnings(decode(washed_out, 224), 224) if "intensity range" in w]
