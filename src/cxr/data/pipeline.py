"""Images on disk -> tf.data pipelines of (image batch, one-hot label batch).

Every image is decoded and resized once into a uint8 array memory-mapped from the decode cache, keyed by
the files' paths, sizes and modification times and the image size: memory stays flat as the dataset grows,
a second run skips decoding, and a changed file gives a new key, so a stale cache is never read.
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr.atomic import atomic_path, write_json
from cxr.errors import UserError, list_paths, warn

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module import


def load_image(path, size):
    """Decode any JPEG, PNG (8/16-bit, grey, RGBA, palette) or BMP into a (size, size, 3) uint8 RGB array.

    Raises OSError or ValueError when the file is not a readable image.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # lets the JPEG decoder downscale large X-rays cheaply
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(img, dtype=np.float64)
            top = 65535.0 if array.max() > 255 else 255.0
            img = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _try_load(path, size):
    try:
        return load_image(path, size)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def cache_key(paths, size):
    digest = hashlib.sha1(f"{size}\n".encode())
    for p in paths:
        stat = os.stat(p)
        digest.update(f"{Path(p).resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_all(paths, size, cache_dir):
    """Decoded images for `paths` as a read-only (N, size, size, 3) uint8 memmap, plus the unreadable paths.

    Unreadable files leave a zero image in their row; callers drop them using the returned list.
    """
    paths = [Path(p) for p in paths]
    cache_dir = Path(cache_dir)
    key = cache_key(paths, size)
    array_path = cache_dir / f"images-{size}px-{key}.npy"
    bad_path = cache_dir / f"images-{size}px-{key}.unreadable.json"
    if array_path.is_file() and bad_path.is_file():
        return np.load(array_path, mmap_mode="r"), [Path(p) for p in json.loads(bad_path.read_text())]

    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob(f"images-{size}px-*"):
        old.unlink()  # a stale cache: the files or their list changed since it was written
    bad = []
    with atomic_path(array_path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL while decoding
            for i, image in enumerate(pool.map(lambda p: _try_load(p, size), paths)):
                if image is None:
                    bad.append(paths[i])
                else:
                    array[i] = image
        array.flush()
        del array
    write_json(bad_path, [str(p) for p in bad])
    return np.load(array_path, mmap_mode="r"), bad


def decode_splits(splits, size, cache_dir, strict=False):
    """Decode every split's images once; drop (or, if strict, refuse) unreadable ones.

    Returns (images memmap, {split: (row indices into images, labels)}, the path of each row).
    """
    all_paths = sorted({p for files in splits.files.values() for p in files})
    images, bad = decode_all(all_paths, size, cache_dir)
    if bad:
        if strict:
            raise UserError(f"unreadable or corrupt images: {list_paths(bad)}; remove or replace them, "
                            "or run without --strict")
        warn(f"skipped {len(bad)} unreadable or corrupt images: {list_paths(bad)}")
    row = {p: i for i, p in enumerate(all_paths)}
    bad_set = set(bad)
    indexed = {}
    for split, files in splits.files.items():
        keep = [(row[p], y) for p, y in zip(files, splits.labels[split]) if p not in bad_set]
        if not keep:
            raise UserError(f"the {split} split has no readable images; check the image files")
        rows, labels = zip(*keep)
        indexed[split] = (np.array(rows, dtype=np.int64), np.array(labels, dtype=np.int64))
    return images, indexed, all_paths


def augmentation(seed):
    """Light, anatomy-preserving augmentation for training images (values stay in 0-255)."""
    import keras

    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.05, fill_mode="constant", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
    ], name="augmentation")


def make_dataset(images, rows, labels, num_classes, batch_size, shuffle=False, augment=False, seed=0):
    """A tf.data pipeline of (float32 image batch, one-hot label batch) read from `images[rows]`.

    `images` is any array indexable by a batch of rows (the decode cache, or cached layer outputs); only the
    batches in flight are in memory.
    """
    import tensorflow as tf

    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    ds = tf.data.Dataset.from_tensor_slices((rows, one_hot))
    if shuffle:
        ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def read(batch_rows, y):
        x = tf.numpy_function(lambda r: images[r], [batch_rows], tf.as_dtype(images.dtype), stateful=False)
        x.set_shape([None, *images.shape[1:]])
        return tf.cast(x, tf.float32), y

    ds = ds.map(read, num_parallel_calls=AUTOTUNE, deterministic=True)
    if augment:
        augmenter = augmentation(seed)
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)
