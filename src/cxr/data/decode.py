"""The one decode function: an image file -> a (size, size, 3) uint8 RGB array, for every command.

Training, evaluation, predict and explain all decode through `decode_image`, so a file reads the same
everywhere and fails the same way everywhere: as `UnreadableImage`, never as a library's own exception.
"""

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}


class UnreadableImage(ValueError):
    """A file that is not a readable image (corrupt, truncated, not an image, a decompression bomb)."""


def is_image_file(path):
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(path, size):
    """Decode a JPEG, PNG (8/16-bit, grey, RGBA, palette) or BMP into a (size, size, 3) uint8 RGB array.

    Raises UnreadableImage naming the file when it can't be read as an image.
    """
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # lets the JPEG decoder downscale large X-rays cheaply
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.asarray(img, dtype=np.float64)
                top = 65535.0 if array.max() > 255 else 255.0
                img = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise UnreadableImage(f"{path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def try_decode(path, size):
    """`decode_image`, or None for an unreadable file."""
    try:
        return decode_image(path, size)
    except UnreadableImage:
        return None
