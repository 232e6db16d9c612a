"""The one decode function: an image file -> a (size, size, 3) uint8 RGB array, for every command.

Training, evaluation, predict and explain all decode through `decode_image`, so a file reads the same
everywhere and fails the same way everywhere: as `UnreadableImage`, never as a library's own exception.
"""

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
ORIENTATION = 0x0112  # the EXIF tag


class UnreadableImage(ValueError):
    """A file that is not a readable image (corrupt, truncated, not an image, a decompression bomb)."""


def is_image_file(path):
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def png_significant_bits(path):
    """The bit depth a PNG's sBIT chunk declares for its grey (or first) channel, or None without one."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"sBIT":
                data = f.read(length)
                return data[0] if data else None
            if kind in (b"IDAT", b"IEND"):  # sBIT must come before the image data
                return None
            f.seek(length + 4, 1)  # the chunk's data and CRC


def full_scale(path, array):
    """The value that stands for white in a high-bit-depth grey image.

    X-ray exports often keep 10, 12 or 14 significant bits in a 16-bit PNG. The rule: the PNG's sBIT chunk
    when it has one (2^bits - 1), else the smallest 2^k - 1 (k >= 8) that holds the image's maximum.
    """
    bits = png_significant_bits(path)
    if not bits:
        bits = max(8, int(np.ceil(np.log2(float(array.max()) + 1))))
    return float(2 ** bits - 1)


def decode_image(path, size):
    """Decode a JPEG, PNG (8/16-bit, grey, RGBA, palette) or BMP into a (size, size, 3) uint8 RGB array.

    High-bit-depth grey images are scaled by `full_scale`. Raises UnreadableImage naming the file when it
    can't be read as an image.
    """
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # lets the JPEG decoder downscale large X-rays cheaply
            if img.getexif().get(ORIENTATION, 1) != 1:  # a phone's or camera's export, shown as it was taken
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.clip(np.asarray(img, dtype=np.float64), 0, None)
                top = full_scale(path, array)
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
