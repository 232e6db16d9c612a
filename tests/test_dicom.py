"""DICOM in: the pixel pipeline on files built with pydicom from real X-rays of the sample, every refusal and
failure as one clear error, PatientID as the split key, and no patient data in any output."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxr.cli import main
from cxr.data.decode import RefusedImage, UnreadableImage, decode, image_warnings, is_image_file
from cxr.data.split import make_groups
from tests.conftest import SAMPLE, TINY

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLossless, JPEGLSLossless,  # noqa: E402
                         RLELossless, SecondaryCaptureImageStorage, generate_uid)

REAL = SAMPLE.parents[3] / "shared" / "data" / "dicom" / "nih-chestxray14-dx.dcm"
XRAY = sorted((SAMPLE / "PNEUMONIA").iterdir())[0]
SIZE = 96


def grey_xray(path=XRAY):
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def write_dicom(path, stored, photometric="MONOCHROME2", bits=8, signed=False, modality="DX", **elements):
    """A DICOM file of `stored` values ((H, W) grey, (H, W, 3) RGB or (frames, H, W)) with the given header."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PAT-0001", "19800101"
    if modality:
        ds.Modality = modality
    rgb = stored.ndim == 3 and stored.shape[-1] == 3
    ds.Rows, ds.Columns = stored.shape[-3:-1] if rgb else stored.shape[-2:]
    if stored.ndim == 3 and not rgb:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def stretched(values):
    """The no-window rule: the image's own minimum to maximum -> 0-255."""
    values = values.astype(np.float64)
    return np.uint8((values - values.min()) / (values.max() - values.min()) * 255 + 0.5)


def decoded_as_png(tmp_path, expected_8bit):
    """What decode gives for the 8-bit image a viewer would show (the reference each DICOM case must match)."""
    png = tmp_path / "expected.png"
    Image.fromarray(expected_8bit).save(png)
    return decode(png, SIZE).pixels.astype(int)


def assert_matches(tmp_path, dicom_path, expected_8bit, tolerance=1):
    got = decode(dicom_path, SIZE).pixels.astype(int)
    assert np.abs(got - decoded_as_png(tmp_path, expected_8bit)).max() <= tolerance


def test_the_real_nih_dicom_decodes_like_its_pixels_with_no_warning():
    if not REAL.is_file():
        pytest.skip("../shared/data/dicom is not beside this checkout")
    image = decode(REAL, 224)
    assert (image.width, image.height, image.mode) == (1024, 1024, "DICOM") and image_warnings(image, 224) == []
    pixels = pydicom.dcmread(REAL).pixel_array
    reference = np.asarray(Image.fromarray(stretched(pixels)).convert("RGB").resize((224, 224), Image.BILINEAR))
    assert np.abs(image.pixels.astype(int) - reference).max() <= 1


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    g = grey_xray()
    write_dicom(tmp_path / "m1.dcm", 255 - g, photometric="MONOCHROME1")
    assert_matches(tmp_path, tmp_path / "m1.dcm", stretched(g))


@pytest.mark.parametrize("bits, scale, signed", [(10, 4, False), (12, 16, False), (14, 64, False), (16, 256, False),
                                                 (16, 100, True)])
def test_high_bit_depths_with_rescale_slope_and_intercept(tmp_path, bits, scale, signed):
    g = grey_xray().astype(np.int64)
    stored = g * scale - (12000 if signed else 0)
    write_dicom(tmp_path / "hi.dcm", stored, bits=bits, signed=signed, RescaleSlope="0.5", RescaleIntercept="-1024")
    assert_matches(tmp_path, tmp_path / "hi.dcm", stretched(g))


def test_the_first_window_is_applied_after_the_rescale(tmp_path):
    g = grey_xray().astype(np.int64)
    stored = g * 16  # 12-bit
    hounsfield_like = stored * 2.0 - 1000  # slope 2, intercept -1000
    center, width = float(np.percentile(hounsfield_like, 50)), 2000.0
    write_dicom(tmp_path / "w.dcm", stored, bits=12, RescaleSlope="2", RescaleIntercept="-1000",
                WindowCenter=[center, 0.0], WindowWidth=[width, 10.0])  # the first of two windows
    viewer = np.clip((hounsfield_like - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert_matches(tmp_path, tmp_path / "w.dcm", np.uint8(viewer * 255 + 0.5))


def test_a_voi_lut_sequence_wins_over_the_window(tmp_path):
    g = grey_xray().astype(np.int64)
    stored = g * 16
    lut = np.uint16(np.sqrt(np.arange(4096) / 4095) * 4095)  # a gamma curve, 12-bit output
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    write_dicom(tmp_path / "lut.dcm", stored, bits=12, VOILUTSequence=[item], WindowCenter=100, WindowWidth=10)
    assert_matches(tmp_path, tmp_path / "lut.dcm", np.uint8(lut[stored] / 4095 * 255 + 0.5))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "jpeg2000", "jpeg-ls"])
def test_compressed_transfer_syntaxes_decode_to_the_same_image(tmp_path, syntax):
    g = grey_xray().astype(np.uint16) * 16
    plain = write_dicom(tmp_path / "plain.dcm", g, bits=12)
    plain.compress(syntax)
    plain.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(decode(tmp_path / "compressed.dcm", SIZE).pixels, decode(tmp_path / "plain.dcm", SIZE).pixels)


def test_baseline_jpeg_dicom_decodes_through_pillow(tmp_path):
    """Baseline JPEG has no encoder in pydicom: the frame is Pillow's JPEG, encapsulated as a PACS would."""
    import io

    from pydicom.uid import JPEGBaseline8Bit

    g = grey_xray()
    frame = io.BytesIO()
    Image.fromarray(g).save(frame, "JPEG", quality=95)
    ds = write_dicom(tmp_path / "plain.dcm", g)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([frame.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    reference = decode(tmp_path / "plain.dcm", SIZE).pixels.astype(int)
    assert np.abs(decode(tmp_path / "jpeg.dcm", SIZE).pixels.astype(int) - reference).mean() < 2  # JPEG's loss


def test_rgb_secondary_capture_is_taken_as_is(tmp_path):
    with Image.open(XRAY) as img:
        rgb = np.asarray(img.convert("RGB"))
    write_dicom(tmp_path / "sc.dcm", rgb, modality="DX")
    png = tmp_path / "sc.png"
    Image.fromarray(rgb).save(png)
    assert np.array_equal(decode(tmp_path / "sc.dcm", SIZE).pixels, decode(png, SIZE).pixels)


def test_multi_frame_uses_the_first_frame_with_a_warning(tmp_path):
    g = grey_xray()
    write_dicom(tmp_path / "cine.dcm", np.stack([g, 255 - g]))
    image = decode(tmp_path / "cine.dcm", SIZE)
    assert any("2 frames" in w for w in image_warnings(image, SIZE))
    assert_matches(tmp_path, tmp_path / "cine.dcm", stretched(g))


def test_lateral_views_and_other_body_parts_are_flagged(tmp_path):
    g = grey_xray()
    write_dicom(tmp_path / "lat.dcm", g, ViewPosition="LL", BodyPartExamined="ABDOMEN", BurnedInAnnotation="YES")
    warnings = image_warnings(decode(tmp_path / "lat.dcm", SIZE), SIZE)
    assert any("lateral" in w for w in warnings) and any("ABDOMEN" in w for w in warnings)
    assert any("burned-in" in w for w in warnings)
    write_dicom(tmp_path / "pa.dcm", g, ViewPosition="PA", BodyPartExamined="CHEST", BurnedInAnnotation="NO")
    assert image_warnings(decode(tmp_path / "pa.dcm", SIZE), SIZE) == []


def test_a_file_without_extension_is_dicom_by_its_content(tmp_path):
    write_dicom(tmp_path / "1.2.840.113619.2.55.3", grey_xray())  # a PACS export named by its UID
    bare = tmp_path / "IM0001"
    shutil.copy(tmp_path / "1.2.840.113619.2.55.3", bare)
    assert is_image_file(bare) and is_image_file(tmp_path / "1.2.840.113619.2.55.3")
    assert not is_image_file(SAMPLE.parents[2] / "README.md")
    assert np.array_equal(decode(bare, SIZE).pixels, decode(tmp_path / "1.2.840.113619.2.55.3", SIZE).pixels)


def test_refusals_and_failures_name_the_file_and_say_why(tmp_path):
    g = grey_xray()
    write_dicom(tmp_path / "ct.dcm", g, modality="CT")
    with pytest.raises(RefusedImage, match=r"ct\.dcm: a CT image.*CR, DX or DR"):
        decode(tmp_path / "ct.dcm", SIZE)
    whole = write_dicom(tmp_path / "whole.dcm", g.astype(np.uint16) * 16, bits=12)
    data = (tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:len(data) // 2])
    with pytest.raises(UnreadableImage, match=r"cut\.dcm: .*Explicit VR Little Endian"):
        decode(tmp_path / "cut.dcm", SIZE)
    whole.file_meta.TransferSyntaxUID = JPEGLossless  # no permissive decoder: the error says which package would
    whole.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64)])
    whole.save_as(tmp_path / "lossless.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableImage, match=r"lossless\.dcm: .*JPEG Lossless.*pylibjpeg-libjpeg"):
        decode(tmp_path / "lossless.dcm", SIZE)


def test_patient_id_groups_files_whatever_their_names(tmp_path):
    g = grey_xray()
    paths = [tmp_path / name for name in ("a.dcm", "b.dcm", "c.dcm")]
    write_dicom(paths[0], g, PatientID="P-1")
    write_dicom(paths[1], 255 - g, PatientID="P-1")
    write_dicom(paths[2], g // 2, PatientID="P-2")
    groups = sorted(sorted(group) for group in make_groups(paths))
    assert groups == [[0, 1], [2]]


def test_decode_cache_holds_dicom_like_other_files(tmp_path):
    from cxr.data.pipeline import decode_all

    write_dicom(tmp_path / "x.dcm", grey_xray())
    images, bad = decode_all([tmp_path / "x.dcm"], SIZE, tmp_path / "cache")
    assert not bad and np.array_equal(images[0], decode(tmp_path / "x.dcm", SIZE).pixels)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_dicom_and_its_windowed_png_export_get_the_same_prediction(tiny_run, tmp_path, capsys):
    """A viewer's 8-bit PNG export of a windowed 12-bit X-ray, and the DICOM itself, through `cxr predict`."""
    g = grey_xray().astype(np.int64)
    stored = g * 16
    write_dicom(tmp_path / "xray.dcm", stored, bits=12, WindowCenter=2000, WindowWidth=3000)
    viewer = np.clip((stored - 1999.5) / 2999 + 0.5, 0, 1)
    Image.fromarray(np.uint8(viewer * 255 + 0.5)).save(tmp_path / "xray-export.png")
    assert main(["predict", str(tmp_path / "xray.dcm"), str(tmp_path / "xray-export.png"), "--model",
                 str(tiny_run / "models/model.h5"), "--format", "json"]) == 0
    dicom_record, png_record = json.loads(capsys.readouterr().out)
    assert dicom_record["label"] == png_record["label"]
    assert abs(dicom_record["p_PNEUMONIA"] - png_record["p_PNEUMONIA"]) < 0.02


def test_training_on_dicom_splits_by_patient_and_writes_no_patient_data(tmp_path):
    """A raw/ folder of DICOM files only (two per patient, names that don't carry the patient), trained on."""
    for c, name in enumerate(("NORMAL", "PNEUMONIA")):
        for k, source in enumerate(sorted((SAMPLE / name).iterdir())[:16]):
            patient = f"{name[:3]}-{k // 2:03d}"
            write_dicom(tmp_path / "data" / "raw" / name / f"scan{c}{k:02d}.dcm", grey_xray(source),
                        PatientID=f"ID-{patient}", PatientName=f"Surname{patient}^Given", PatientBirthDate="19700101")
    result = subprocess.run([sys.executable, "-m", "cxr", "train", "--data-dir", str(tmp_path / "data"),
                             "--output-dir", str(tmp_path / "out"), "--bootstrap", "20", *TINY],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    splits = {}
    for split in ("train", "val", "test"):
        for path in (tmp_path / "data" / split).rglob("*.dcm"):
            patient = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
            splits.setdefault(patient, set()).add(split)
    assert sum(len(v) for v in splits.values()) == len(splits) == 16  # each patient in exactly one split
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix in (".json", ".csv", ".html")]
    assert {"summary.json", "splits.csv", "report.html", "class_names.json"} <= {p.name for p in written}
    for text in [result.stdout, result.stderr] + [p.read_text(errors="replace") for p in written]:
        assert "Surname" not in text and "ID-NOR" not in text and "ID-PNE" not in text and "19700101" not in text


@pytest.mark.parametrize("center, width", [("", "400"), ("abc", "400"), ("40", ""), ("1e999", "400")],
                         ids=["empty-center", "text-center", "empty-width", "infinite-center"])
def test_an_unusable_window_falls_back_to_the_full_range_with_a_warning(tmp_path, center, width):
    """Audit 2026-12-06, fault 1: an empty or non-numeric Window Center raised a TypeError/ValueError out of
    decode, and every command that met the file failed with a traceback."""
    g = grey_xray()
    path = tmp_path / "window.dcm"
    write_dicom(path, g)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00281050, "DS", None)  # Window Center, written as raw text below: pydicom checks DS values
    ds.add_new(0x00281051, "DS", None)
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    for tag, value in ((b"\x28\x00\x50\x10DS", center), (b"\x28\x00\x51\x10DS", width)):
        text = value.encode() + (b" " if len(value) % 2 else b"")
        raw = raw.replace(tag + b"\x00\x00", tag + len(text).to_bytes(2, "little") + text, 1)
    path.write_bytes(raw)
    image = decode(path, SIZE)
    assert any("window" in w for w in image_warnings(image, SIZE))
    assert_matches(tmp_path, path, stretched(g))


def test_malformed_header_values_make_an_unreadable_image_not_a_crash(tmp_path):
    g = grey_xray()
    path = tmp_path / "rows.dcm"
    write_dicom(path, g)
    raw = path.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00"  # Rows, US, 2 bytes -> as IS (text) "ab": not a number
    assert rows in raw
    path.write_bytes(raw.replace(rows, b"\x28\x00\x10\x00IS\x02\x00", 1).replace(
        b"\x28\x00\x10\x00IS\x02\x00" + raw[raw.index(rows) + 8:raw.index(rows) + 10], b"\x28\x00\x10\x00IS\x02\x00ab", 1))
    with pytest.raises(UnreadableImage, match=r"rows\.dcm: "):
        decode(path, SIZE)


def test_the_pixel_limit_counts_every_frame_and_only_the_first_is_decoded(tmp_path):
    """Audit 2026-12-06, fault 3: the limit counted rows x columns only, and pydicom decoded every frame."""
    from cxr.data.decode import ImageTooLarge

    g = grey_xray()[:100, :100]
    write_dicom(tmp_path / "frames.dcm", np.stack([g] * 20))
    with pytest.raises(ImageTooLarge, match=r"frames\.dcm: 100 x 100 pixels x 20 frames, more than the 100000"):
        decode(tmp_path / "frames.dcm", SIZE, max_pixels=100_000)
    decoded = []
    original = pydicom.Dataset.pixel_array_options

    def spy(self, **options):
        decoded.append(options.get("index"))
        return original(self, **options)

    pydicom.Dataset.pixel_array_options = spy
    try:
        assert decode(tmp_path / "frames.dcm", SIZE, max_pixels=200_000).pixels.shape == (SIZE, SIZE, 3)
    finally:
        pydicom.Dataset.pixel_array_options = original
    assert decoded == [0]


def test_a_png_that_carries_a_dicom_is_read_as_dicom_by_path_and_by_upload(tmp_path):
    """Audit 2026-12-06, fault 14: such a file got the PNG's answer from cxr predict and the DICOM's from
    cxr serve. One rule now: the DICOM marker wins, whatever the file's name."""
    import io

    g = grey_xray()
    write_dicom(tmp_path / "x.dcm", g)
    tiny = io.BytesIO()
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tiny, format="PNG")
    assert len(tiny.getvalue()) <= 128
    polyglot = tiny.getvalue().ljust(128, b"\0") + (tmp_path / "x.dcm").read_bytes()[128:]
    (tmp_path / "both.png").write_bytes(polyglot)
    with Image.open(tmp_path / "both.png") as img:
        assert img.format == "PNG"  # a valid PNG too
    by_path, by_bytes = decode(tmp_path / "both.png", SIZE), decode(polyglot, SIZE)
    assert by_path.mode == by_bytes.mode == "DICOM"
    assert np.array_equal(by_path.pixels, by_bytes.pixels)
    assert np.array_equal(by_path.pixels, decode(tmp_path / "x.dcm", SIZE).pixels)
