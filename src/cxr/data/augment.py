"""Augmentation of training images: Keras preprocessing layers, and two layers of cxr's own against the
shortcuts that sit outside the lungs.

X-ray devices burn a laterality marker ("R"/"L") and text (time, exposure) into the image, and collimation
leaves black bands along its edges. Their style, size and place differ between devices and sites and so,
inside one training folder, they can go with the label; a model then reads them instead of the lungs, and at
another site they move its answer. In Kermany's train/ folder they do (benchmarks/README.md, "Shortcuts
outside the lungs"). `BurnedInMarkings` and `RandomBorders` put them on training images of every class, so
that they stop telling the classes apart.

X-rays of every shape are squeezed into one square (by `decode`; the Kermany copy at hand already was), so a
chest's height-to-width ratio on the image depends on the detector's and the crop's shape as much as on the
child. A model trained on one folder learns those proportions with the label: taller chests look like pneumonia
to it (benchmarks/README.md, "Proportions"). The "site-aspect" augmentation zooms height and width apart.
"""

import keras
import numpy as np
import tensorflow as tf


# RandomZoom's (height_factor, width_factor) per kind; a width factor of None keeps the image's proportions
ZOOM = {"seed": (0.1, None), "robust": ((-0.25, 0.1), None), "site": (0.1, None), "site-aspect": (0.15, 0.15)}
SITE_KINDS = ("site", "site-aspect")  # the kinds that burn in markings and black out edges
LETTERS = ("R", "L", "R", "L")
TEXTS = ("PORTABLE", "AP", "SUPINE", "KV/59", "20:26:04", "09:13:52", "1/2", "ERECT")


class BurnedInMarkings(keras.layers.Layer):
    """Burns a white laterality letter or a line of text into the top or bottom margin of some images.

    Each image gets each of `count` markings with probability `rate`, independently. Input and output:
    (batch, side, side, 3) float images in 0-255. The letters are 8-16% of the side tall, the text 4-6%,
    at a random place along the top or bottom tenth, with a brightness of 160-255.
    """

    def __init__(self, rate=0.5, count=2, seed=None, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})  # pixels, even under --mixed-precision
        self.rate, self.count, self.seed = rate, count, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.side = int(input_shape[1])
        self.stamps = tf.constant(render_stamps(self.side))

    def call(self, images, training=True):
        if not training:
            return images
        for _ in range(self.count):
            images = self._burn_one(images)
        return images

    def _burn_one(self, images):
        kinds, stamp_h, stamp_w = self.stamps.shape
        batch, side = tf.shape(images)[0], self.side
        u = keras.random.uniform((batch, 5), seed=self.seed_generator)
        which = tf.minimum(tf.cast(u[:, 0] * kinds, tf.int32), kinds - 1)
        band = tf.cast(u[:, 1] * 0.1 * side, tf.int32)
        top = tf.where(u[:, 2] < 0.5, band, side - stamp_h - band)
        left = tf.cast(u[:, 3] * (side - stamp_w), tf.int32)
        rows = tf.range(side)[None, :, None] - top[:, None, None]  # (batch, side, 1): row inside the stamp
        cols = tf.range(side)[None, None, :] - left[:, None, None]  # (batch, 1, side)
        inside = (rows >= 0) & (rows < stamp_h) & (cols >= 0) & (cols < stamp_w)
        index = tf.stack([tf.broadcast_to(x, (batch, side, side)) for x in (
            which[:, None, None], tf.clip_by_value(rows, 0, stamp_h - 1), tf.clip_by_value(cols, 0, stamp_w - 1))],
            axis=-1)
        alpha = tf.gather_nd(self.stamps, index)
        alpha *= tf.cast(inside, alpha.dtype) * tf.cast(u[:, 4] < self.rate, alpha.dtype)[:, None, None]
        brightness = keras.random.uniform((batch, 1, 1, 1), 160.0, 255.0, seed=self.seed_generator)
        alpha = alpha[..., None]
        return images * (1.0 - alpha) + brightness * alpha

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "count": self.count, "seed": self.seed}


def render_stamps(side):
    """(kinds, height, width) float32 masks in 0-1 of the letters and texts, drawn for images of `side` pixels:
    each on a canvas of the largest one's size, at its top left."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(0)
    drawn = []
    for texts, low, high in ((LETTERS, 0.08, 0.16), (TEXTS, 0.04, 0.06)):
        for text in texts:
            size = max(6, int(round(side * rng.uniform(low, high) * 1.3)))  # a font's em is ~1.3 x a capital
            font = ImageFont.load_default(size=size)
            left, top, right, bottom = font.getbbox(text)
            canvas = Image.new("L", (max(1, right - left), max(1, bottom - top)))
            ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
            drawn.append(np.asarray(canvas, np.float32) / 255.0)
    height = min(side // 3, max(d.shape[0] for d in drawn))
    width = min(side * 2 // 3, max(d.shape[1] for d in drawn))
    stamps = np.zeros((len(drawn), height, width), np.float32)
    for i, d in enumerate(drawn):
        d = d[:height, :width]
        stamps[i, :d.shape[0], :d.shape[1]] = d
    return stamps


class RandomBorders(keras.layers.Layer):
    """Blacks out a band of random width along each edge of some images, as collimation does.

    rate: the share of images that get them; each of the four bands is 0 to `max_fraction` of the side wide.
    Input and output: (batch, side, side, 3) float images.
    """

    def __init__(self, rate=0.5, max_fraction=0.12, seed=None, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})  # pixels, even under --mixed-precision
        self.rate, self.max_fraction, self.seed = rate, max_fraction, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        u = keras.random.uniform((batch, 5), seed=self.seed_generator)
        sides = tf.cast(tf.stack([height, height, width, width]), u.dtype)
        top, bottom, left, right = tf.unstack(tf.cast(u[:, :4] * self.max_fraction * sides, tf.int32), axis=1)
        rows = tf.range(height)[None, :, None]
        cols = tf.range(width)[None, None, :]
        keep = ((rows >= top[:, None, None]) & (rows < height - bottom[:, None, None])
                & (cols >= left[:, None, None]) & (cols < width - right[:, None, None]))
        keep |= (u[:, 4] >= self.rate)[:, None, None]
        return images * tf.cast(keep, images.dtype)[..., None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "max_fraction": self.max_fraction, "seed": self.seed}


def augmentation(kind, seed):
    """Anatomy-preserving augmentation for training images (values stay in 0-255); `kind` is one of
    `data.pipeline.AUGMENTATIONS`, the keys of ZOOM (the pipeline names them without importing TensorFlow).

    "seed": the seed script's light geometric set (flip, small rotation, zoom and translation).
    "robust": the same, plus what changes between X-ray devices: brightness, contrast and sharpness (from
    blurred to over-sharpened), and wider zoom in (crops).
    "site": the seed's set, plus what differs between sites outside the lungs: burned-in markers and text, and
    black bands along the edges (`BurnedInMarkings`, `RandomBorders`).
    "site-aspect": the site set with the height and the width zoomed apart, each by up to 15 %, so that a chest's
    proportions (see the module's docstring) stop telling the classes apart.
    """
    if kind not in ZOOM:
        raise ValueError(f"augmentation must be one of {', '.join(ZOOM)}, got {kind!r}")
    height_zoom, width_zoom = ZOOM[kind]
    layers = [keras.layers.RandomFlip("horizontal", seed=seed),
              keras.layers.RandomRotation(0.05, fill_mode="constant", seed=seed),
              keras.layers.RandomZoom(height_zoom, width_zoom, fill_mode="constant", seed=seed),
              keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed)]
    if kind == "robust":
        layers += [keras.layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed),
                   keras.layers.RandomContrast(0.3, value_range=(0, 255), seed=seed),
                   keras.layers.RandomSharpness((0.25, 0.75), value_range=(0, 255), seed=seed)]
    if kind in SITE_KINDS:
        # after the flip, so that a letter reads the right way round; borders last, to cut into the markings
        layers += [BurnedInMarkings(seed=seed), RandomBorders(seed=seed)]
    return keras.Sequential(layers, name="augmentation")
