"""A prediction as the DICOM objects a PACS stores beside the X-ray (`cxr listen`), made with highdicom:

- a Comprehensive SR, an Imaging Measurement Report (TID 1500): one measurement group per class or finding with
  its calibrated probability, its threshold and whether it was called, and one for the population check; the
  model's name, version and SHA-256 as the algorithm's identification; the source image referenced;
- a Secondary Capture: the X-ray with its Grad-CAM overlay under a banner "AI result, not for diagnosis: ...".

Both join the source's patient and study, each in a series of its own. Their UIDs are derived from the source
image's and the model's, so sending the same X-ray again makes the same objects, which a PACS stores once.
"""

import io
import warnings
from dataclasses import dataclass

import numpy as np

MANUFACTURER = "cxr"  # what marks an object cxr made, so that a result routed back to it is not analysed again
SR_SERIES = (9901, "cxr AI result, not for diagnosis (structured report)")
SC_SERIES = (9902, "cxr AI result, not for diagnosis (Grad-CAM overlay)")
SC_LONG_SIDE = 1024  # the overlay's size: a viewer shows it beside the X-ray, not instead of it
BANNER = "AI result, not for diagnosis"
CXR_SCHEME = "99CXR"  # codes of cxr's own (a private coding scheme, as DICOM PS3.16 8.2 allows)


@dataclass
class Result:
    """What the model said about one image: `class_names`, their calibrated `probabilities` (classes,), which
    were `called` (classes,) bool, their `thresholds` (classes,) (None where a class has none: argmax), the
    `label` shown, the population check's `population` record (`PopulationCheck.record`; all None without a
    check) and the `model` (`SavedModel`)."""
    class_names: list
    probabilities: np.ndarray
    called: np.ndarray
    thresholds: list
    label: str
    population: dict
    model: object

    @property
    def banner(self):
        """The line burned into the Secondary Capture."""
        shown = [k for k in np.argsort(-self.probabilities, kind="stable") if self.called[k]] or [
            int(np.argmax(self.probabilities))]
        text = f"{BANNER}: {self.label} " + ", ".join(
            f"p={self.probabilities[k]:.3f}" if len(shown) == 1 else f"{self.class_names[k]} p={self.probabilities[k]:.3f}"
            for k in shown[:3])
        if self.population["in_distribution"] is False:
            text += " | FLAGGED: unlike the training images, not reliable"
        return text


def result_from_prediction(model, probabilities, label, population):
    """The `Result` of one image: `probabilities` (classes,) calibrated, `label` as `SavedModel.calibrate` gives
    it (a class index, or a multi-label model's (findings,) 0/1 row)."""
    names, task = model.class_names, model.task
    called, thresholds = task.called_mask(label), task.thresholds(model.operating_point)
    shown = task.label_text(label, probabilities)
    return Result(names, np.asarray(probabilities, dtype=float), called, thresholds, shown, population, model)


def _uid(*parts):
    from pydicom.uid import generate_uid

    return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])


def class_code(name, own=None):
    """The coded concept of a class or finding: the site's own code (`own`: {class: vocabulary.Code}, from
    --codes) where it gives one, else SNOMED CT where cxr's vocabulary knows one, else a code of cxr's own."""
    from highdicom.sr import CodedConcept

    from cxr.data.vocabulary import coding

    code = coding([name], own)[name]
    if code is None:
        return CodedConcept(name.upper()[:16], CXR_SCHEME, name[:64])
    return CodedConcept(code.value, code.scheme, code.meaning)


def _code(value, meaning):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, CXR_SCHEME, meaning)


THRESHOLD = ("THRESHOLD", "Decision threshold on the calibrated probability")
POPULATION = ("POPULATION", "Like the images the model was trained on (population check)")
POPULATION_SCORE = ("POPSCORE", "Population check score")
POPULATION_PERCENTILE = ("POPPERCENTILE", "Population score percentile among validation images")


# The patient and study attributes a result copies from its source: Type 2, so present even when empty
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                     "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _reference(source):
    """The header of `source` a result needs (no pixels), copied leniently: an element whose value its value
    representation doesn't allow (a StudyDate "2024-02-29", a PatientSex "Male", a PatientAge "81") is dropped,
    since an archive rejects or mangles a result that carries it, and whatever was acknowledged must still be
    answered. Each Type 2 attribute of PATIENT_AND_STUDY the source left out (or held invalid) is present and
    empty (highdicom requires them). A source without a Study Instance UID gets one derived from its SOP
    Instance UID, so that its results join one study of their own (and a resend makes the same UIDs)."""
    from pydicom import config
    from pydicom.dataset import Dataset
    from pydicom.valuerep import validate_value

    reference = Dataset()
    for element in source:
        if element.tag == 0x7FE00010:  # Pixel Data
            continue
        try:
            if element.VR != "SQ":
                validate_value(element.VR, element.value, config.RAISE)
            if element.keyword == "PatientSex" and element.value not in ("M", "F", "O", "", None):
                raise ValueError("PatientSex is M, F or O")
            reference.add(element)
        except Exception:  # noqa: BLE001 - a value that can't be read or isn't valid: left out
            continue
    for keyword in PATIENT_AND_STUDY:
        if keyword not in reference:
            setattr(reference, keyword, "")
    if not str(reference.get("StudyInstanceUID", "")).strip():
        reference.StudyInstanceUID = _uid(source.SOPInstanceUID, "study")
    return reference


def structured_report(source, result):
    """The Comprehensive SR (pydicom Dataset) of `result` for the image `source` (a pydicom Dataset)."""
    import highdicom as hd
    from cxr import __version__
    from pydicom.sr.codedict import codes

    source = _reference(source)
    model = result.model
    sha = model.sha256 or "unknown"
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"cxr {model.backbone or 'classifier'}", version=__version__,
        parameters=[f"model SHA-256 {sha}", f"operating point: {model.operating_point.get('method', 'argmax')}"])
    image = [hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)]
    groups = []
    for k, name in enumerate(result.class_names):
        finding = class_code(name, result.model.codes)
        measurements = [hd.sr.Measurement(codes.DCM.Probability, float(result.probabilities[k]), codes.UCUM.NoUnits,
                                          algorithm_id=algorithm)]
        if result.thresholds[k] is not None:
            measurements.append(hd.sr.Measurement(_code(*THRESHOLD), float(result.thresholds[k]), codes.UCUM.NoUnits))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(source.SOPInstanceUID, sha, name),
                                                         identifier=f"cxr: {name}"[:64]),
            finding_type=finding, algorithm_id=algorithm, source_images=image, measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                finding, codes.SCT.Present if result.called[k] else codes.SCT.Absent)]))
    population = result.population
    if population["in_distribution"] is not None:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(source.SOPInstanceUID, sha, "population"),
                                                         identifier="cxr: population check"),
            finding_type=_code(*POPULATION), algorithm_id=algorithm, source_images=image,
            measurements=[
                hd.sr.Measurement(_code(*POPULATION_SCORE), float(population["population_score"]), codes.UCUM.NoUnits),
                hd.sr.Measurement(_code(*POPULATION_PERCENTILE), float(population["population_percentile"]),
                                  codes.UCUM.Percent)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                _code(*POPULATION), codes.SCT.Yes if population["in_distribution"] else codes.SCT.No)]))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("cxr model", sha), name="cxr", manufacturer_name=MANUFACTURER,
            model_name=(model.backbone or "classifier")[:64], serial_number=sha[:16]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=groups)
    with warnings.catch_warnings():  # highdicom warns about the source's names, which it copies as they are
        warnings.simplefilter("ignore")
        sr = hd.sr.ComprehensiveSR(
            evidence=[source], content=report[0], series_instance_uid=_uid(source.StudyInstanceUID, sha, "sr"),
            series_number=SR_SERIES[0], sop_instance_uid=_uid(source.SOPInstanceUID, sha, "sr"), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
            series_description=SR_SERIES[1])
    return sr


def secondary_capture(source, display, heatmap, result):
    """The Secondary Capture (pydicom Dataset): `display` ((H, W) or (H, W, 3) uint8, the X-ray as a viewer shows
    it) with the Grad-CAM `heatmap` ((h, w) in [0, 1]) blended over it and `result.banner` above it."""
    import highdicom as hd

    from cxr.evaluate.gradcam import overlay

    source = _reference(source)
    pixels = with_banner(overlay(_display_rgb(display), heatmap), result.banner)
    sha = result.model.sha256 or "unknown"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc = hd.sc.SCImage.from_ref_dataset(
            source, pixels, "RGB", 8, "PATIENT", _uid(source.StudyInstanceUID, sha, "sc"), SC_SERIES[0],
            _uid(source.SOPInstanceUID, sha, "sc"), 1, MANUFACTURER, patient_orientation=("L", "F"),
            transfer_syntax_uid="1.2.840.10008.1.2.1", series_description=SC_SERIES[1])
    # as the source says, or empty (Type 2: unknown) - highdicom wants a value only to build the dataset
    sc.PatientOrientation = source.get("PatientOrientation", "")
    # a chest is not a paired body part, so General Series' Laterality (Type 2C) is absent, which validators accept
    # once the body part is named
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"  # the banner: text in the pixels (it holds no patient data)
    sc.ImageComments = result.banner[:10240]
    sc.DerivationDescription = f"Grad-CAM overlay of the X-ray, by cxr (model SHA-256 {sha})"[:1024]
    return sc


def _display_rgb(display):
    """The X-ray at most SC_LONG_SIDE pixels on its long side, RGB."""
    from PIL import Image

    img = Image.fromarray(display)
    scale = SC_LONG_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    return np.asarray(img.convert("RGB"))


def with_banner(pixels, text):
    """`pixels` (H, W, 3) uint8 with a black strip on top holding `text` in yellow, wrapped to the width."""
    from PIL import Image, ImageDraw, ImageFont

    width = pixels.shape[1]
    font = ImageFont.load_default(size=max(12, width // 40))
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width * 0.96:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    step = int(font.size * 1.3)
    strip = Image.new("RGB", (width, step * len(lines) + step // 2), "black")
    draw = ImageDraw.Draw(strip)
    for k, text_line in enumerate(lines):
        draw.text((width * 0.02, step // 4 + k * step), text_line, fill=(255, 220, 0), font=font)
    return np.concatenate([np.asarray(strip), pixels])


def to_bytes(dataset):
    """A DICOM file's bytes (preamble, file meta) for a pydicom Dataset."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
