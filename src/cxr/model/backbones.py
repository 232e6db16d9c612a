"""The backbone registry: one entry per backbone, with everything the rest of cxr needs to know about it.

Like fastai's `model_meta`: how to build it, how to load its ImageNet weights, where fine-tuning starts by
default, and how its layer names map to blocks (where `models.split_at_frozen_prefix` may cut). Adding a
backbone is adding an entry here. Keras is imported only when a backbone is built, so `config` and the CLI can
list the names without it.
"""

import re
from dataclasses import dataclass
from typing import Callable, Optional

from cxr.errors import UserError


def kerasapp_block(layer_name):
    """'block6c_project_conv' -> 'block6c'; None for the stem and top layers (Keras' EfficientNet naming)."""
    match = re.match(r"(block\d+[a-z])_", layer_name)
    return match.group(1) if match else None


POPULATION_TAPS = ("block4c_add", "block5c_add", "block6d_add")


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable  # (input_shape, input_tensor) -> keras.Model: the convolutional part, randomly initialised
    # The same with ImageNet weights (a builder of its own: Keras' B0 gains a layer when built with them)
    build_imagenet: Callable
    # The first layer phase 2 fine-tunes by default; everything before it stays frozen (`--frozen-layers`
    # counts the same point in layers). The keras-io EfficientNet example names its point by block ("block7").
    fine_tune_from: str
    augment: str = "seed"  # the default --augment (data.augment.augmentation)
    finetune_epochs: Optional[int] = None  # the default cap on phase 2's epochs (--finetune-epochs); None: --epochs
    test_time_scales: tuple = (1.0,)  # the default --test-time-scales: the zoomed views a saved model averages
    feature_views: int = 2  # the default --feature-views: augmented views of each training image in the cache
    block_of: Callable[[str], Optional[str]] = kerasapp_block  # layer name -> its block, None outside blocks
    # The layers whose pooled outputs the population check reads, besides the last feature map: the ends of
    # blocks 4, 5 and 6 separated adults, photos and edited X-rays from a pediatric model's own population best
    # of the depths measured (bench_population.py in benchmarks/README.md).
    population_taps: tuple = POPULATION_TAPS


def _build_b0(input_shape, input_tensor):
    import keras

    return keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=input_shape,
                                             input_tensor=input_tensor)


def _build_b0_imagenet(input_shape, input_tensor):
    import keras

    try:
        return keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=input_shape,
                                                 input_tensor=input_tensor)
    except Exception as error:  # Keras reports a failed download as a bare Exception
        raise UserError(
            f"could not download EfficientNetB0 ImageNet weights ({str(error).splitlines()[0]}); offline, use "
            "--backbone efficientnet-lite0 (weights ship with cxr) or --weights PATH to a local weights file"
        ) from None


def _build_lite0(input_shape, input_tensor):
    from cxr.model import lite0

    return lite0.build(input_shape, input_tensor=input_tensor)


def _build_lite0_imagenet(input_shape, input_tensor):
    from cxr.model import lite0

    return lite0.load_imagenet_weights(_build_lite0(input_shape, input_tensor))


def _build_test(input_shape, input_tensor):
    from cxr.model import lite0

    return lite0.build(input_shape, input_tensor=input_tensor, name="test_efficientnet", width=0.25, depth=0.5)


def _no_imagenet(input_shape, input_tensor):
    raise UserError("--backbone test-efficientnet has no ImageNet weights; give --weights none (it is for tests)")


# The seed froze the first 200 layers of an ImageNet B0: fine-tuning starts inside block 6c, at its
# squeeze-excitation; B0 keeps that point and the seed's augmentation. Lite0, cxr's own default, is where
# issue 13's measurements led (bench_generalization.py in benchmarks/README.md, three seeds each): fine-tuning
# from block 5a did better at another site than the seed's point (recipe "deep"); burned-in markings and black
# edges on every class ("site") made it read less of what lies outside the lungs and do better still; and
# fine-tuning from block 4a (50 layers frozen) for 5 epochs ("block4") did as well as block 5a for up to 12, in
# a run of fixed length: about 8 minutes here, against 11-16. Its saved model averages two views of each image,
# as it is and shrunk to 0.9 inside a black frame: better on validation, the internal test split and at another
# site for every model measured, for twice the inference (a third view, the centre enlarged by 1.1, added about
# a third as much again on validation for half as much again inference). Zooming height and width apart in
# training ("site-aspect") took away much of its reading of the chest's proportions and did better at another
# site for every seed measured, for a little less on the internal test split. Four augmented views of each image
# in the feature cache instead of two gave that back inside, and read less of the shortcuts, for about a minute
# more (phase 2's epochs stay as long: an epoch is one pass over the images, each drawn from one of its views).
REGISTRY = {backbone.name: backbone for backbone in (
    Backbone("efficientnetb0", _build_b0, _build_b0_imagenet, fine_tune_from="block6c_se_reduce"),
    Backbone("efficientnet-lite0", _build_lite0, _build_lite0_imagenet, fine_tune_from="block4a_expand_conv",
             augment="site-aspect", finetune_epochs=5, test_time_scales=(0.9, 1.0), feature_views=4),
    # Lite0 a quarter as wide with half its blocks' repeats (98 layers, not 157; 0.18 M weights, not 3.4 M), with
    # Lite0's defaults and block names: for tests of everything around the network, which then train, trace and
    # convert in a fraction of Lite0's time (as timm's test_* models do). Random weights only; never a clinical
    # model.
    Backbone("test-efficientnet", _build_test, _no_imagenet, fine_tune_from="block4a_expand_conv",
             augment="site-aspect", finetune_epochs=5, test_time_scales=(0.9, 1.0), feature_views=4,
             population_taps=("block4b_add", "block5b_add", "block6b_add")),
)}
NAMES = tuple(REGISTRY)


def population_taps(name):
    """The population check's layers for backbone `name`; the shared default for a model saved without its
    backbone's name."""
    return REGISTRY[name].population_taps if name in REGISTRY else POPULATION_TAPS


def get(name):
    """The registry entry for `name`; UserError naming the choices for an unknown one."""
    if name not in REGISTRY:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name]
