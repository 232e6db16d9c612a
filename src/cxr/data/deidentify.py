"""Patient data removed from a DICOM image on its way into a training folder (DICOM PS3.15 Annex E).

The Basic Application Level Confidentiality Profile, with its Retain Patient Characteristics option (sex and age,
which the subgroup analysis reads) and Retain UIDs option (so that labels keyed by SOP Instance UID still find
their image), applied as an allow-list: the image is rebuilt from the attributes below and nothing else, so a
private tag, a free-text comment or an attribute the profile's table names under another keyword can't slip
through. Patient ID and name become a pseudonymous key, the HMAC-SHA-256 of the Patient ID under a secret of the
pull's (`pseudonym`): the same patient gets the same key in every pull into the same folder, so splits stay by
patient, and nobody without that secret can turn a key back into an ID. Dates, times, accession numbers, names of
people and institutions are gone.

What no allow-list removes: text burned into the pixels. An image whose Burned In Annotation is YES is refused
(`BurnedInAnnotation`); one that doesn't say may still carry it, as the profile's Clean Pixel Data option warns.
"""

from cxr.data.cohort import pseudonym

# What a training folder needs of an image: how to decode and window it, what it shows, and who it is of (as
# characteristics, not identity). Everything else is dropped.
KEPT = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "ViewPosition", "BodyPartExamined", "ImageLaterality", "Laterality", "PatientOrientation",
    "ImageType", "PresentationIntentType", "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName",
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns", "NumberOfFrames",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelPaddingValue", "PixelSpacing",
    "ImagerPixelSpacing", "PixelAspectRatio", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "PixelIntensityRelationship", "PixelIntensityRelationshipSign", "LossyImageCompression",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod", "BurnedInAnnotation", "PixelData",
)
# Type 2 attributes of the image's modules: present, and empty, so that the file stays a valid object
EMPTIED = ("PatientBirthDate", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
           "SeriesNumber", "InstanceNumber")
METHOD = ("cxr pull: DICOM PS3.15 Basic Application Level Confidentiality Profile with the Retain Patient "
          "Characteristics and Retain UIDs options, as an allow-list")
OPTIONS = (("113100", "Basic Application Confidentiality Profile"), ("113108", "Retain Patient Characteristics Option"),
           ("113110", "Retain UIDs Option"))


class BurnedInAnnotation(ValueError):
    """The image says text is burned into its pixels: patient data the profile can't remove from a header."""


def deidentify(ds, secret):
    """A new Dataset of `ds` (a pydicom Dataset with file meta) without patient data, its Patient ID and name the
    pseudonymous key of `ds`'s Patient ID. BurnedInAnnotation when `ds` says its pixels carry text."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise BurnedInAnnotation("its Burned In Annotation is YES: text in the pixels may name the patient")
    clean = Dataset()
    for keyword in KEPT:
        if keyword in ds:
            clean[keyword] = ds[keyword]
    for keyword in EMPTIED:
        setattr(clean, keyword, "")
    key = pseudonym(secret, ds.get("PatientID", ""), "P")
    clean.PatientID = clean.PatientName = key
    clean.PatientIdentityRemoved = "YES"
    clean.DeidentificationMethod = METHOD
    clean.DeidentificationMethodCodeSequence = [_code(value, meaning) for value, meaning in OPTIONS]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    clean.file_meta = meta
    return clean


def _code(value, meaning):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item
