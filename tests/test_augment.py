import keras
import numpy as np

from cxr.data.augment import BurnedInMarkings, RandomBorders, augmentation, render_stamps


def grey_batch(n=8, side=64, value=90.0):
    return np.full((n, side, side, 3), value, np.float32)


def test_markings_are_burned_into_the_top_or_bottom_margin_only_and_repeat_with_the_seed():
    side = 64
    images = grey_batch(side=side)
    marked = np.asarray(BurnedInMarkings(rate=1.0, count=1, seed=3)(images, training=True))
    changed = np.any(marked != images, axis=-1)  # (n, side, side)
    assert changed.any(axis=(1, 2)).all()  # rate 1: every image got one
    assert marked.max() > 150 and marked.min() >= images.min() and marked.max() <= 255  # white, in range
    stamp_height = render_stamps(side).shape[1]
    rows = np.flatnonzero(changed.any(axis=(0, 2)))
    margin = int(0.1 * side) + stamp_height
    assert np.all((rows < margin) | (rows >= side - margin))  # never over the lungs in the middle
    np.testing.assert_array_equal(changed[:, margin:side - margin], False)
    again = np.asarray(BurnedInMarkings(rate=1.0, count=1, seed=3)(images, training=True))
    np.testing.assert_array_equal(marked, again)
    np.testing.assert_array_equal(BurnedInMarkings(rate=1.0, seed=3)(images, training=False), images)
    none = np.asarray(BurnedInMarkings(rate=0.0, seed=3)(images, training=True))
    np.testing.assert_array_equal(none, images)


def test_markings_draw_letters_and_text_that_fit_small_images():
    for side in (32, 96, 224):
        stamps = render_stamps(side)
        assert stamps.shape[1] <= side // 3 and stamps.shape[2] <= side * 2 // 3
        assert stamps.min() >= 0 and stamps.max() <= 1
        assert (stamps.reshape(len(stamps), -1).max(axis=1) > 0.5).all()  # every stamp drew something


def test_borders_black_out_bands_along_the_edges_and_keep_the_centre():
    side, fraction = 60, 0.12
    images = grey_batch(n=32, side=side)
    bordered = np.asarray(RandomBorders(rate=1.0, max_fraction=fraction, seed=0)(images, training=True))
    band = int(np.ceil(fraction * side))
    np.testing.assert_array_equal(bordered[:, band:-band, band:-band], images[:, band:-band, band:-band])
    assert set(np.unique(bordered)) <= {0.0, 90.0}
    black_rows = (bordered[..., 0] == 0).all(axis=2)  # (n, side): whole rows blacked out
    assert black_rows[:, 0].mean() > 0.5 and not black_rows[:, band:-band].any()
    half = np.asarray(RandomBorders(rate=0.5, seed=0)(grey_batch(n=200, side=side), training=True))
    touched = (half == 0).any(axis=(1, 2, 3)).mean()
    assert 0.35 < touched < 0.65


def test_site_aspect_zooms_height_and_width_apart_where_site_keeps_the_proportions():
    squares = np.zeros((32, 64, 64, 3), np.float32)
    squares[:, 16:48, 16:48] = 255.0

    def height_over_width(kind, training=True):
        zoom = next(layer for layer in augmentation(kind, seed=3).layers if isinstance(layer, keras.layers.RandomZoom))
        white = np.asarray(zoom(squares, training=training))[..., 0] > 127
        return white.any(axis=2).sum(axis=1) / white.any(axis=1).sum(axis=1)

    np.testing.assert_allclose(height_over_width("site"), 1.0, atol=0.07)  # zoomed, proportions kept
    stretched = height_over_width("site-aspect")
    assert stretched.min() < 0.9 and stretched.max() > 1.1  # some squares made wide, some tall
    np.testing.assert_array_equal(height_over_width("site-aspect", training=False), 1.0)  # never at inference


def test_each_backbone_has_its_default_augmentation_views_and_fine_tuning_cap_and_the_options_override_them():
    from cxr.cli import build_parser, config_from_args
    from cxr.training.config import Config

    parser = build_parser()

    def augment(*argv):
        return config_from_args(parser.parse_args(["train", *argv])).augment

    assert augment() == "site-aspect"  # the default backbone, Lite0
    assert augment("--backbone", "efficientnetb0") == "seed"  # B0: the seed script's
    assert augment("--backbone", "efficientnet-lite0") == "site-aspect"
    assert augment("--backbone", "efficientnet-lite0", "--augment", "seed") == "seed"
    assert Config(backbone="efficientnet-lite0").augment == "site-aspect"
    assert Config(backbone="efficientnet-lite0").to_dict()["augment"] == "site-aspect"  # summary.json names it
    assert Config(backbone="efficientnetb0").feature_views == 2 and Config().feature_views == 4
    assert config_from_args(parser.parse_args(["train", "--backbone", "efficientnet-lite0", "--feature-views",
                                               "1"])).feature_views == 1
    assert Config(backbone="efficientnet-lite0").finetune_epochs == 5  # Lite0 stops phase 2 after 5 epochs
    assert Config(backbone="efficientnet-lite0", epochs=3).finetune_epochs == 3  # never more than --epochs
    assert Config(backbone="efficientnetb0").finetune_epochs == 30  # B0: the seed's --epochs for both phases
    assert config_from_args(parser.parse_args(["train", "--backbone", "efficientnet-lite0", "--finetune-epochs",
                                               "20"])).finetune_epochs == 20


def test_every_augmentation_the_options_offer_exists():
    from cxr.data.augment import ZOOM
    from cxr.data.pipeline import AUGMENTATIONS

    assert set(ZOOM) == set(AUGMENTATIONS)
