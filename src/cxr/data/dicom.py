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


def subgroup_tags(path):
    """{"sex", "age", "view", "manufacturer", "device_model"} from the file's DICOM header (None where a tag is
    missing or the file unreadable): what a subgroup analysis groups by, aggregated before any report."""
    try:
        ds = _open(path, stop_before_pixels=True, specific_tags=list(SUBGROUP_TAGS.values()))
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are decoded
        return dict.fromkeys(SUBGROUP_TAGS)
    return {key: (str(ds.get(tag)).strip() or None) if ds.get(tag) is not None else None
            for key, tag in SUBGROUP_TAGS.items()}


def read_dicom(source, name, max_pixels=None):
    """(uint8 array (H, W) grey or (H, W, 3) RGB, [warnings]) for a DICOM X-ray; DicomError naming `name`,
    TooManyPixels when Rows x Columns exceeds `max_pixels` (checked before the pixel data is decoded)."""
    try:
        ds = _open(source)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise DicomError(f"{name}: not a readable DICOM file ({_first_line(error)})") from None
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
    if "PixelData" not in ds:
        raise DicomError(f"{name}: a DICOM file without an image (no Pixel Data)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if max_pixels is not None and rows * columns > max_pixels:
        raise TooManyPixels(f"{name}: {columns} x {rows} pixels, more than the {max_pixels} allowed")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - a missing decoder, truncated or inconsistent pixel data
        raise DicomError(_decode_failure(ds, name, error)) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
        warnings.append(f"{frames} frames: the first one is used")
    if pixels.ndim == 3:  # colour: pydicom has already converted YBR to RGB
        return _to_uint8_rgb(pixels, ds), warnings
    return to_display(pixels, ds), warnings


def to_display(stored, ds):
    """The grayscale pipeline (module docstring) for one frame of stored values -> (H, W) uint8."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        table_input = np.rint(values).astype(np.int64)  # a LUT maps integer values
        grey = np.asarray(apply_voi(table_input, ds, index=0), dtype=np.float64) / (2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        grey = window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        low, high = values.min(), values.max()
        grey = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 1.0 - grey
    return np.uint8(np.clip(grey, 0.0, 1.0) * 255.0 + 0.5)


def window(values, center, width, function="LINEAR"):
    """A VOI window as the standard defines it (C.11.2.1.2), to [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with the narrowest window: a threshold
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _to_uint8_rgb(pixels, ds):
    if pixels.dtype == np.uint8:
        return pixels
    top = 2 ** int(ds.get("BitsStored", 8)) - 1
    return np.uint8(np.clip(pixels.astype(np.float64) / top, 0, 1) * 255 + 0.5)


def _first(value):
    """The first of a multi-valued DICOM element (Window Center can hold several windows), as a float."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


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
