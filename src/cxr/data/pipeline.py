"""Images on disk -> the decode cache -> tf.data pipelines of (image batch, one-hot label batch).

Every image is decoded and resized once into a uint8 array in the decode cache, keyed by the files' paths,
sizes and modification times and the image size, and read back a batch of rows at a time: memory stays flat
as the dataset grows, a second run skips decoding, and a changed file gives a new key, so a stale cache is
never read.
"""

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr.atomic import atomic_path, write_json
from cxr.data.decode import try_decode
from cxr.progress import progress

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module import


def cache_key(paths, size):
    digest = hashlib.sha1(f"{size}\n".encode())
    for p in paths:
        stat = os.stat(p)
        # os.fsencode: file names are bytes on disk, and need not be valid UTF-8 (a Latin-1 "R\xf6ntgen.png")
        digest.update(os.fsencode(Path(p).resolve()) + f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class DiskArray:
    """A read-only .npy array whose rows are read from disk when indexed (`a[i]`, `a[2:5]`, `a[[7, 3]]`).

    np.load(mmap_mode="r") would read the same way, but every page it touches counts in the process's
    resident memory until the kernel takes it back, so RSS would grow with the dataset; reads through the
    page cache keep it flat.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        version = np.lib.format.read_magic(self._file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, _, self.dtype = read_header(self._file)  # C order: write_array (and np.save) write that
        self._offset = self._file.tell()
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._lock = threading.Lock()  # tf.data reads batches from several threads; seek + read must pair up

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rows = np.arange(len(self))[index]
        out = np.empty((*rows.shape, *self.shape[1:]), self.dtype)
        for row, target in zip(rows.reshape(-1), out.reshape(-1, *self.shape[1:])):
            with self._lock:
                self._file.seek(self._offset + int(row) * self._row_bytes)
                done = self._file.readinto(memoryview(target).cast("B"))
            if done != self._row_bytes:
                raise OSError(f"{self.path}: row {row} is cut short; delete the file to rebuild it")
        return out

    def close(self):
        self._file.close()


def write_array(path, shape, dtype, blocks):
    """Write the row blocks that `blocks` yields, in order, as one .npy array of `shape` at `path`.

    Only one block is in memory at a time; returns the file as a `DiskArray`.
    """
    dtype = np.dtype(dtype)
    written = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            f.write(block.data)
            written += len(block)
    if written != shape[0]:
        raise ValueError(f"{path}: {written} rows written, {shape[0]} expected")
    return DiskArray(path)


def decode_all(paths, size, cache_dir):
    """Decoded images for `paths` as a read-only (N, size, size, 3) uint8 `DiskArray`, plus {unreadable path:
    why}.

    Unreadable files leave a zero image in their row; callers drop them using the returned dict.
    """
    paths = [Path(p) for p in paths]
    cache_dir = Path(cache_dir)
    key = cache_key(paths, size)
    array_path = cache_dir / f"images-{size}px-{key}.npy"
    bad_path = cache_dir / f"images-{size}px-{key}.unreadable.json"
    if array_path.is_file() and bad_path.is_file():
        recorded = json.loads(bad_path.read_text())
        if isinstance(recorded, list):  # written before the reasons were kept
            recorded = {p: "unreadable" for p in recorded}
        return DiskArray(array_path), {Path(p): reason for p, reason in recorded.items()}

    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob(f"images-{size}px-*"):
        old.unlink()  # a stale cache: the files or their list changed since it was written
    bad = {}

    def decoded(pool):
        blank = np.zeros((1, size, size, 3), np.uint8)
        decoded_images = progress(pool.map(lambda p: try_decode(p, size), paths), total=len(paths), desc="Decoding")
        for (image, reason), path in zip(decoded_images, paths):  # the bar first, so that it ends
            if image is None:
                bad[path] = reason
            yield blank if image is None else image[None]

    with atomic_path(array_path) as tmp, ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL
        write_array(tmp, (len(paths), size, size, 3), np.uint8, decoded(pool)).close()
    write_json(bad_path, {str(p): reason for p, reason in bad.items()})
    return DiskArray(array_path), bad


AUGMENTATIONS = ("seed", "robust", "site", "site-aspect")  # data.augment.augmentation (its ZOOM: one per kind)


def make_dataset(images, rows, labels, batch_size, augment=None, seed=0):
    """A tf.data pipeline of (float32 image batch, label batch) read from `images[rows]` and `labels`.

    `images` is anything indexable by a batch of rows with `shape` and `dtype` (the decode cache, cached layer
    outputs, a numpy array); only the batches in flight are in memory. `labels` is (len(rows), classes):
    one-hot rows for a single-label dataset, in the order of `rows` (training shuffles them beforehand, by
    epoch: `train.training_order`). `augment`: None, or one of AUGMENTATIONS (`data.augment`; training only).
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(rows), np.asarray(labels, dtype=np.float32)))
    ds = ds.batch(batch_size)

    def read(batch_rows, y):
        x = tf.numpy_function(lambda r: images[r], [batch_rows], tf.as_dtype(images.dtype), stateful=False)
        x.set_shape([None, *images.shape[1:]])
        return tf.cast(x, tf.float32), y

    ds = ds.map(read, num_parallel_calls=AUTOTUNE, deterministic=True)
    if augment:
        from cxr.data.augment import augmentation

        augmenter = augmentation(augment, seed)
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)
