"""The shortcut check: edits outside the lungs, and how the report reads a model's answers to them."""

import numpy as np

from cxr.evaluate.report import shortcut_section
from cxr.evaluate.shortcuts import probes, shortcut_check

SIDE = 64


class ReadsRegion:
    """A stand-in for a SavedModel's predict: calls PNEUMONIA when the region's mean is dark. Reading the outer
    tenth of the image is a shortcut; reading the centre is what a model should do."""

    class_names, positive_index = ["NORMAL", "PNEUMONIA"], 1
    multi_label = False

    def __init__(self, region):
        self.region = region

    def predict(self, x, batch_size=32):
        band = SIDE // 10
        if self.region == "edges":
            mask = np.ones((SIDE, SIDE), bool)
            mask[band:-band, band:-band] = False
        else:
            mask = np.zeros((SIDE, SIDE), bool)
            mask[SIDE // 4:-SIDE // 4, SIDE // 4:-SIDE // 4] = True
        p = (x[:, mask].mean(axis=(1, 2)) < 60).astype(float)
        return np.stack([1 - p, p], axis=1), p.astype(int)


def grey_images(n):
    """n NORMAL-like images: even grey, a dark centre for the second half (what ReadsRegion('centre') calls
    PNEUMONIA)."""
    x = np.full((n, SIDE, SIDE, 3), 150, np.uint8)
    x[n // 2:, SIDE // 4:-SIDE // 4, SIDE // 4:-SIDE // 4] = 20
    return x


def test_each_edit_leaves_the_centre_alone_and_keeps_the_batch_shape():
    x = np.random.default_rng(0).integers(40, 200, (3, SIDE, SIDE, 3)).astype(np.uint8)
    edits = probes()
    assert len(edits) == 4
    for name, edit in edits.items():
        edited = edit(x)
        assert edited.shape == x.shape and edited.dtype == np.uint8, name
        assert not np.array_equal(edited, x), name
    black = edits["black edges (10% of each side)"](x)
    assert (black[:, :6] == 0).all() and (black[:, :, -6:] == 0).all()
    assert np.array_equal(black[:, 7:-7, 7:-7], x[:, 7:-7, 7:-7])
    marked = edits["burned-in markings (a letter and a line of text)"](x)
    middle = slice(SIDE // 3, SIDE - SIDE // 3)
    assert np.array_equal(marked[:, middle], x[:, middle])  # markings start in the top or bottom tenth
    square = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    square[:, 16:48, 16:48] = 255
    tall = edits["taller (height stretched by 15%)"](square)[0, ..., 0] > 127
    assert tall.any(axis=1).sum() >= 1.12 * tall.any(axis=0).sum()  # the square became a tall rectangle


def test_a_model_that_reads_the_edges_is_caught_and_one_that_reads_the_centre_is_not():
    y = np.zeros(20, int)  # every image NORMAL
    images = grey_images(20)
    shortcut = shortcut_check(ReadsRegion("edges"), images, np.arange(20), y)
    assert shortcut["n_images"] == 20 and shortcut["negatives_called_positive"] == 0
    edges = shortcut["probes"]["black edges (10% of each side)"]
    assert edges == {"changed_calls": 1.0, "negatives_called_positive": 1.0}
    assert shortcut["probes"]["burned-in markings (a letter and a line of text)"]["changed_calls"] == 0

    lungs = shortcut_check(ReadsRegion("centre"), images, np.arange(20), y)
    assert lungs["negatives_called_positive"] == 0.5  # the dark-centred half
    for name in ("black edges (10% of each side)", "burned-in markings (a letter and a line of text)"):
        assert lungs["probes"][name]["changed_calls"] == 0, name

    flagged = shortcut_section(shortcut, ReadsRegion.class_names, "PNEUMONIA")
    assert "change more than 5% of the calls: black edges." in flagged
    assert "NORMAL images called PNEUMONIA" in flagged and "0.0% &rarr; 100.0%" in flagged
    assert "No edit changed more than" in shortcut_section(
        {**lungs, "probes": {k: v for k, v in lungs["probes"].items() if not k.startswith("zoomed")}},
        ReadsRegion.class_names, "PNEUMONIA")


def test_the_check_probes_a_seeded_sample_of_the_rows_it_is_given():
    images = grey_images(600)  # rows 0-299 even grey, 300-599 dark-centred
    y = np.zeros(600, int)
    first = shortcut_check(ReadsRegion("centre"), images, np.arange(600), y, seed=3)
    assert first == shortcut_check(ReadsRegion("centre"), images, np.arange(600), y, seed=3)
    assert first["n_images"] == 400 and 0.4 < first["negatives_called_positive"] < 0.6
    dark = np.arange(300, 600)  # the evaluated split's rows inside a larger decode cache
    assert shortcut_check(ReadsRegion("centre"), images, dark, y[dark])["negatives_called_positive"] == 1.0
