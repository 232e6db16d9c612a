"""The one decode function: an image file (JPEG, PNG, BMP or DICOM; a path or an upload's bytes) -> a
(size, size, 3) uint8 RGB array, for every command.

Training, evaluation, calibrate, predict, explain and serve all decode through `decode` / `decode_image`, so
a file reads the same everywhere and fails the same way everywhere: as `UnreadableImage` (or its subclasses
`ImageTooLarge` and `RefusedImage`), never as a library's own exception. DICOM's pixel pipeline is in `dicom`.
"""

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxr.data import dicom

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
IMAGE_KINDS = ".jpg, .jpeg, .png, .bmp or DICOM"  # for messages
# What a server or listener decodes at most (rows x columns x frames): a 43 cm flat-panel detector at 0.14 mm pixels
# gives about 9.5 MP; a decompression bomb needs far more. A 49 MP 12-bit DICOM peaks at about 290 MB while it
# decodes (measured 2026-12-07; the grey pipeline runs a band of rows at a time).
MAX_PIXELS = 50_000_000
ORIENTATION = 0x0112  # the EXIF tag
# image_warnings' limits (0-255 scale): mean distance of a pixel's channels from their grey; the spread from
# the 1st to the 99th percentile
COLOUR_TOLERANCE = 4
NARROW_RANGE = 64


class UnreadableImage(ValueError):
    """A file that is not a readable image (corrupt, truncated, not an image, a decompression bomb)."""


class ImageTooLarge(UnreadableImage):
    """An image with more pixels than the caller allows (a server's guard against decompression bombs)."""


class RefusedImage(UnreadableImage):
    """A readable file that is not what the model may classify (a DICOM CT or MR, not a radiograph)."""


def is_image_file(path):
    """An image cxr reads: .jpg, .jpeg, .png, .bmp, or DICOM (by extension or by content)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS or dicom.is_dicom(path)


def is_dicom_file(source):
    """A path or bytes that hold DICOM, by content: the one rule of every command (`cxr serve` sniffs uploads the
    same way). A file named .jpg/.jpeg/.png/.bmp is DICOM only with 'DICM' after its 128-byte preamble: a
    preamble may hold another format's header, and the DICOM marker wins over it."""
    if not isinstance(source, (bytes, bytearray)) and Path(source).suffix.lower() in IMAGE_EXTENSIONS:
        return dicom.has_dicom_marker(source)
    return dicom.is_dicom(source)


def png_significant_bits(source):
    """The bit depth a PNG's sBIT chunk declares for its grey (or first) channel, or None without one.

    `source`: a path or the file's bytes.
    """
    with (io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")) as f:
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


def full_scale(source, array):
    """The value that stands for white in a high-bit-depth grey image.

    X-ray exports often keep 10, 12 or 14 significant bits in a 16-bit PNG. The rule: the PNG's sBIT chunk
    when it has one (2^bits - 1), else the smallest 2^k - 1 (k >= 8) that holds the image's maximum.
    """
    bits = png_significant_bits(source)
    if not bits:
        bits = max(8, int(np.ceil(np.log2(float(array.max()) + 1))))
    return float(2 ** bits - 1)


@dataclass(frozen=True)
class DecodedImage:
    """An image as the model sees it (`pixels`: (size, size, 3) uint8 RGB) and what the file held before that:
    its width and height in pixels, its PIL mode ("L", "RGB", "I;16"...; "DICOM" for DICOM files) and what
    reading it found worth a warning (`notes`: a lateral view, several frames...)."""
    pixels: np.ndarray
    width: int
    height: int
    mode: str
    notes: tuple = ()


def decode(source, size, max_pixels=None, name=None):
    """Decode a JPEG, PNG (8/16-bit, grey, RGBA, palette), BMP or DICOM file into a `DecodedImage` of `size` x
    `size`.

    `source`: a path, or the file's bytes (an upload). High-bit-depth grey images are scaled by `full_scale`;
    DICOM goes through `dicom.read_dicom`'s pixel pipeline. Raises UnreadableImage naming the file (or `name`)
    when it can't be read as an image, RefusedImage for a DICOM that isn't a radiograph, and ImageTooLarge when
    it has more than `max_pixels` pixels (checked from the header, before any pixel is decoded).
    """
    if name is None:
        name = "the uploaded image" if isinstance(source, (bytes, bytearray)) else source
    try:
        empty = len(source) == 0 if isinstance(source, (bytes, bytearray)) else Path(source).stat().st_size == 0
    except OSError as error:
        raise UnreadableImage(f"{name}: {error.strerror}") from None
    if empty:
        raise UnreadableImage(f"{name}: an empty file (0 bytes)")
    if is_dicom_file(source):
        return _decode_dicom(source, size, max_pixels, name)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
            width, height, mode = img.width, img.height, img.mode
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"{name}: {width} x {height} pixels, more than the {max_pixels} allowed")
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # lets the JPEG decoder downscale large X-rays cheaply
            if img.getexif().get(ORIENTATION, 1) != 1:  # a phone's or camera's export, shown as it was taken
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                img = Image.fromarray(_high_depth_to_uint8(source, np.asarray(img), size))
            return DecodedImage(_resized(img, size), width, height, mode)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"{name}: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError) as error:  # UnidentifiedImageError is an OSError
        if isinstance(error, ImageTooLarge):
            raise
        raise UnreadableImage(f"{name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def _high_depth_to_uint8(source, array, size):
    """A 16-bit (or 32-bit, float) grey image `array` scaled to 0-255 (`full_scale`) and, when it is more than twice
    the model's `size`, averaged over blocks first: at full size its float copy would take eight bytes a pixel
    (a 7000 x 7000 export, 400 MB), and the resize that follows averages as much anyway."""
    top = full_scale(source, array)
    factor = min(array.shape[:2]) // (2 * size)
    if factor > 1:
        h, w = array.shape[0] // factor * factor, array.shape[1] // factor * factor
        array = array[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return np.clip(np.asarray(array, dtype=np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _decode_dicom(source, size, max_pixels, name):
    try:
        array, notes = dicom.read_dicom(source, name, max_pixels)
    except dicom.TooManyPixels as error:
        raise ImageTooLarge(str(error)) from None
    except dicom.RefusedDicom as error:
        raise RefusedImage(str(error)) from None
    except dicom.DicomError as error:
        raise UnreadableImage(str(error)) from None
    return DecodedImage(_resized(Image.fromarray(array), size), array.shape[1], array.shape[0], "DICOM", tuple(notes))


def _resized(img, size):
    """The (size, size, 3) uint8 RGB array of a PIL image: the one resize every input gets."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_image(source, size):
    """`decode(source, size).pixels`: the (size, size, 3) uint8 RGB array every command feeds the model."""
    return decode(source, size).pixels


def image_warnings(image, model_size):
    """Why a `DecodedImage` may not be the grey X-ray the model was trained on, as short sentences.

    `model_size`: the model's input side; an image smaller than that was blown up to fit it.
    """
    warnings = list(image.notes)
    sample = image.pixels[::2, ::2].astype(np.int16)  # every 4th pixel is plenty for these statistics
    if np.abs(sample - sample.mean(axis=2, keepdims=True)).mean() > COLOUR_TOLERANCE:
        warnings.append("colour image: X-rays are grey; is this a photo or an annotated screenshot?")
    if min(image.width, image.height) < model_size:
        warnings.append(f"very small image ({image.width} x {image.height} pixels, the model takes {model_size} x "
                        f"{model_size}): enlarged, fine detail is missing")
    share = np.cumsum(np.bincount(image.pixels[::2, ::2].ravel(), minlength=256)) / sample.size
    low, high = np.searchsorted(share, 0.01), np.searchsorted(share, 0.99)
    if high - low < NARROW_RANGE:
        warnings.append(f"unusual intensity range (1st-99th percentile {low}-{high} of 0-255): "
                        "washed out, very dark or wrongly windowed")
    return warnings


def try_decode(path, size):
    """(`decode_image(path, size)`, None), or (None, why the file can't be used) for an unreadable file."""
    try:
        return decode_image(path, size), None
    except UnreadableImage as error:
        return None, str(error).removeprefix(f"{path}: ")


def describe_skipped(reasons, limit=3):
    """'a.dcm (a CT image...), b.png (truncated) and 4 more' for {path: reason}: which files, and why."""
    items = [f"{path} ({reason})" for path, reason in reasons.items()]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
