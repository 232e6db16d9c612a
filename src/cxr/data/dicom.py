"""DICOM X-rays (pydicom) -> the 8-bit image a radiologist's viewer shows, for `decode.decode`.

The pixel pipeline, in the standard's order (PS3.3 C.11, "Grayscale transformations"):
1. Modality LUT: the Modality LUT Sequence, else Rescale Slope and Intercept (pydicom's `apply_modality_lut`).
2. VOI LUT: the first VOI LUT Sequence item; else the first Window Center / Width pair with its VOI LUT
   Function (LINEAR, LINEAR_EXACT or SIGMOID); else the full range of the image's values (its minimum to its
   maximum) - the rule most viewers use for an image with no window.
3. MONOCHROME1 (bone dark) inverted so that bone is bright, as in MONOCHROME2.
4. Scaled to 8 bits (0-255); `decode` then resizes it like every other image.
RGB images (secondary captures) are taken as they are; multi-frame files use the first frame, with a warning.
Only projection radiography is read: Modality CR, DX or DR (a file without a Modality gets a warning); CT, MR
and the rest are refused. No patient data leaves this module except a salted hash of PatientID.
"""

import hashlib
import io
from pathlib import Path

import numpy as np

DICOM_EXTENSIONS = {".dcm", ".dicom"}
RADIOGRAPHY = {"CR", "DX", "DR"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL"}
PATIENT_SALT = b"cxr-patient-key:"  # a hash of the ID, never the ID, is what a split or a cache may hold
# The package that decodes each compressed transfer syntax (pydicom itself: RLE, deflate), for error messages
DECODERS = {
    "1.2.840.10008.1.2.4.50": "Pillow (JPEG Baseline; installed with cxr)",
    "1.2.840.10008.1.2.4.51": "Pillow (JPEG Extended, 8-bit) or pylibjpeg-libjpeg (GPL-3.0: pip install 'cxr[dicom-gpl]')",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg (GPL-3.0: pip install 'cxr[dicom-gpl]')",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg (GPL-3.0: pip install 'cxr[dicom-gpl]')",
    "1.2.840.10008.1.2.4.80": "pyjpegls (installed with cxr)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (installed with cxr)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg (installed with cxr)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg (installed with cxr)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg (installed with cxr)",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg (installed with cxr)",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg (installed with cxr)",
    "1.2.840.10008.1.2.5": "pydicom itself (RLE Lossless)",
}
# The compressed transfer syntaxes cxr decodes as installed (the others need a GPL package): what `cxr listen`
# accepts besides the uncompressed ones
DECODED_AS_INSTALLED = [uid for uid, package in DECODERS.items() if "GPL" not in package]


class DicomError(ValueError):
    """A DICOM file cxr can't or won't read; the message names the file and says why."""


class RefusedDicom(DicomError):
    """A readable DICOM that is not a chest radiograph cxr may classify (a CT, an MR...)."""


class TooManyPixels(DicomError):
    """A DICOM image larger than the caller allows."""


def has_dicom_marker(source):
    """True when `source` (a path or bytes) carries 'DICM' after the 128-byte preamble."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[128:132]) == b"DICM"
    try:
        with open(source, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom(source):
    """A DICOM file by its extension (.dcm, .dicom) or by its content (PACS exports often have no extension):
    'DICM' after the preamble, or, for a file written without one, a first element of group 0002 or 0008."""
    if not isinstance(source, (bytes, bytearray)) and Path(source).suffix.lower() in DICOM_EXTENSIONS:
        return True
    if has_dicom_marker(source):
        return True
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:4])
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(4)
        except OSError:
            return False
    return _bare_data_set(head)


def _bare_data_set(head):
    """True when `head`, a file's first 4 bytes, is the tag of a data set's first element written without the
    preamble: group 0002 (file meta) or 0008 (identification), little endian, an element below 0x0100."""
    if len(head) < 4:
        return False
    group, element = int.from_bytes(head[:2], "little"), int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x0100


def _open(source, **options):
    import logging
    import warnings

    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom warns (and logs) about every irregularity it reads past; cxr says what matters in its own words
    warnings.filterwarnings("ignore", module=r"pydicom\.")
    logging.getLogger("pydicom").setLevel(logging.ERROR)

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return pydicom.dcmread(handle, **options)
    except InvalidDicomError:  # a .dcm file without the preamble: read it as a bare data set
        if not isinstance(handle, (str, Path)):
            handle.seek(0)
        return pydicom.dcmread(handle, force=True, **options)


def patient_key(path):
    """A salted SHA-256 of the file's PatientID (16 hex digits), or None when it has none or isn't readable."""
    try:
        patient = _open(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID")
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are decoded
        return None
    if not patient or not str(patient).strip():
        return None
    return "dicom-" + hashlib.sha256(PATIENT_SALT + str(patient).strip().encode("utf-8")).hexdigest()[:16]


SUBGROUP_TAGS = {"sex": "PatientSex", "age": "PatientAge", "view": "ViewPosition", "manufacturer": "Manufacturer",
                 "device_model": "ManufacturerModelName"}


def subgroup_tags(source):
    """{"sex", "age", "view", "manufacturer", "device_model"} from the file's DICOM header (None where a tag is
    missing or the file unreadable): what a subgroup analysis groups by, aggregated before any report."""
    return header_values(source, SUBGROUP_TAGS)


def header_values(source, tags):
    """{key: the header's value of tags[key] as text, None where missing} of a DICOM file (a path or its bytes),
    read without its pixels; all None when it is unreadable."""
    try:
        ds = _open(source, stop_before_pixels=True, specific_tags=list(tags.values()))
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are decoded
        return dict.fromkeys(tags)
    return {key: (str(ds.get(tag)).strip() or None) if ds.get(tag) is not None else None
            for key, tag in tags.items()}


def read_dicom(source, name, max_pixels=None):
    """(uint8 array (H, W) grey or (H, W, 3) RGB, [warnings]) for a DICOM X-ray; DicomError naming `name`,
    TooManyPixels when Rows x Columns x Number of Frames exceeds `max_pixels`.

    The header is read first, without the pixel data, so that a refused or oversized image costs no decoding
    (a deflated data set is inflated only as far as its header). Only the first frame is decoded. Any value the
    pixel pipeline can't use is a DicomError (an unreadable image) or, for a window, the full range with a
    warning: never a library's own exception.
    """
    try:
        header = _open(source, stop_before_pixels=True)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise DicomError(f"{name}: not a readable DICOM file ({_first_line(error)})") from None
    try:
        warnings, frames = _check_header(header, name, max_pixels)
    except DicomError:
        raise
    except Exception as error:  # noqa: BLE001 - a header value pydicom can't convert (Rows "abc", ...)
        raise DicomError(f"{name}: its DICOM header can't be read ({_first_line(error)})") from None
    try:
        ds = _open(source)
    except Exception as error:  # noqa: BLE001
        raise DicomError(f"{name}: not a readable DICOM file ({_first_line(error)})") from None
    if "PixelData" not in ds:
        raise DicomError(f"{name}: a DICOM file without an image (no Pixel Data)")
    try:
        if frames > 1:
            ds.pixel_array_options(index=0)  # decode the first frame alone, not all of them
        pixels = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - a missing decoder, truncated or inconsistent pixel data
        raise DicomError(_decode_failure(ds, name, error)) from None
    if frames > 1:
        warnings.append(f"{frames} frames: the first one is used")
    try:
        if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour: pydicom has already converted YBR to RGB
            return _to_uint8_rgb(pixels, ds), warnings
        if pixels.ndim != 2:
            raise DicomError(f"{name}: pixel data of shape {pixels.shape}, not an image")
        return to_display(pixels, ds, warnings), warnings
    except DicomError:
        raise
    except Exception as error:  # noqa: BLE001 - a LUT or rescale value that doesn't fit the pixels
        raise DicomError(f"{name}: its grayscale transformation can't be applied ({_first_line(error)})") from None


def _check_header(ds, name, max_pixels):
    """([warnings], number of frames) for a header cxr may classify; RefusedDicom, TooManyPixels otherwise."""
    warnings = []
    modality = str(ds.get("Modality", "")).upper()
    if modality and modality not in RADIOGRAPHY:
        raise RefusedDicom(f"{name}: a {modality} image (DICOM Modality); cxr reads chest radiographs only "
                           "(Modality CR, DX or DR)")
    if not modality:
        warnings.append("the DICOM file has no Modality: cxr assumes it is a radiograph")
    view = str(ds.get("ViewPosition", "")).upper()
    if view in LATERAL_VIEWS:
        warnings.append(f"lateral view (ViewPosition {view}): the model was trained on frontal X-rays")
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part and body_part != "CHEST":
        warnings.append(f"BodyPartExamined is {body_part}, not CHEST")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        warnings.append("burned-in annotation: the pixels may show patient data; don't share this image or its "
                        "Grad-CAM overlay outside your institution")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    if max_pixels is not None and rows * columns * frames > max_pixels:
        pixels = f"{columns} x {rows} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise TooManyPixels(f"{name}: {pixels}, more than the {max_pixels} allowed")
    return warnings, frames


ROWS_AT_ONCE = 256  # the pipeline's float64 copies exist for this many rows at a time, not the whole image


def to_display(stored, ds, warnings=None):
    """The grayscale pipeline (module docstring) for one frame of stored values -> (H, W) uint8; a window that
    can't be read (an empty or non-numeric Window Center or Width) falls back to the full range, with a note in
    `warnings` (a list) when given.

    Every step is pointwise, so it runs over ROWS_AT_ONCE rows at a time: a 49 MP detector image then costs its
    stored values and the 8-bit result, not 29 bytes a pixel of float64 temporaries.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi

    def chunks():
        for top in range(0, stored.shape[0], ROWS_AT_ONCE):
            yield top, np.asarray(apply_modality_lut(stored[top:top + ROWS_AT_ONCE], ds), dtype=np.float64)

    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])

        def to_grey(values):  # a LUT maps integer values
            return np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), dtype=np.float64) / (2 ** bits - 1)
    elif (chosen := _window(ds)) is not None:
        def to_grey(values):
            return window(values, *chosen)
    else:
        if "WindowCenter" in ds or "WindowWidth" in ds:
            (warnings if warnings is not None else []).append(
                "the DICOM window (Window Center / Width) is empty or not a number: the full range is shown")
        low, high = np.inf, -np.inf
        for _, values in chunks():
            low, high = min(low, values.min()), max(high, values.max())

        def to_grey(values):
            return (values - low) / (high - low) if high > low else np.zeros_like(values)
    inverted = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    display = np.empty(stored.shape[:2], dtype=np.uint8)
    for top, values in chunks():
        grey = to_grey(values)
        if inverted:
            grey = 1.0 - grey
        display[top:top + ROWS_AT_ONCE] = np.uint8(np.clip(grey, 0.0, 1.0) * 255.0 + 0.5)
    return display


def window(values, center, width, function="LINEAR"):
    """A VOI window as the standard defines it (C.11.2.1.2), to [0, 1]: pydicom's `apply_windowing` onto a 16-bit
    output range, rescaled. A function the standard does not define is read as LINEAR, and a LINEAR window
    narrower than 1 as 1 (a threshold at center - 0.5), where pydicom would raise."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    function = function.upper() if function.upper() in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR"
    voi = Dataset()
    voi.PhotometricInterpretation, voi.BitsStored, voi.PixelRepresentation = "MONOCHROME2", 16, 0
    voi.WindowCenter, voi.VOILUTFunction = center, function
    voi.WindowWidth = max(width, 1.0) if function == "LINEAR" else width
    return apply_windowing(np.asarray(values, np.float64), voi) / 65535.0


def _to_uint8_rgb(pixels, ds):
    if pixels.dtype == np.uint8:
        return pixels
    top = 2 ** int(ds.get("BitsStored", 8)) - 1
    return np.uint8(np.clip(pixels.astype(np.float64) / top, 0, 1) * 255 + 0.5)


def _window(ds):
    """(center, width, function) of the first window in `ds`, or None when it has none or it can't be used."""
    try:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
    except Exception:  # noqa: BLE001 - a value pydicom can't convert
        return None
    if center is None or width is None or not np.isfinite([center, width]).all() or width <= 0:
        return None
    return center, width, function


def _first(value):
    """The first of a multi-valued DICOM element (Window Center can hold several windows), as a float; None for
    an empty or non-numeric one."""
    if value is None:
        return None
    try:
        value = value[0] if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__") else value
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _decode_failure(ds, name, error):
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return f"{name}: its pixel data can't be decoded ({_first_line(error)})"
    package = DECODERS.get(str(syntax))
    need = f"; it needs {package}" if package else ""
    return (f"{name}: its pixel data can't be decoded (transfer syntax {syntax.name}, {syntax}{need}): "
            f"{_first_line(error)}")


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
