"""Write a synthetic radiograph as a plausible, non-identifying 12-bit CR or DX DICOM file.

The header carries only made-up values: the synthetic patient id (``PHANTOM-0007``), a matching
name (``Phantom^0007``), no birth date, no accession number, ``PatientIdentityRemoved`` YES.
UIDs come from ``pydicom.uid.generate_uid`` with a deterministic entropy source, so the same
seed gives the same UIDs. MONOCHROME1 files store inverted values (high = less dense), so a
reader that honours the photometric interpretation shows the same picture as MONOCHROME2.
"""

from __future__ import annotations

import datetime as _dt
import io
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BITS_STORED = 12
MAX_STORED = (1 << BITS_STORED) - 1
# (slope, intercept) pairs seen on CR exports; DX for presentation requires identity rescale.
CR_RESCALES = ((1.0, 0.0), (0.5, 0.0), (1.0, -1024.0), (2.0, 100.0))
_BASE_DATE = _dt.date(2020, 1, 6)


def radiograph_dicom_bytes(
    image: np.ndarray,
    *,
    patient_id: str,
    sex: str,
    modality: str,
    photometric: str,
    pixel_spacing_mm: float,
    uid_entropy: Sequence[str],
    acquisition: int = 0,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Encode ``image`` (float [0, 1], bright = dense) as a 12-bit ``modality`` (CR or DX) PA chest file.

    ``uid_entropy`` seeds the study/series/instance UIDs; ``acquisition`` numbers the study of
    this patient (its date moves on by about a season per acquisition); ``rng`` draws exposure
    values and the CR rescale. Returns the bytes of the file (Part 10 format, explicit VR little endian).
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    values = np.round(np.clip(image, 0.0, 1.0) * MAX_STORED).astype(np.uint16)
    stored = MAX_STORED - values if photometric == "MONOCHROME1" else values
    slope, intercept = CR_RESCALES[int(rng.integers(len(CR_RESCALES)))] if modality == "CR" else (1.0, 0.0)
    rescaled = stored.astype(np.float64) * slope + intercept
    lo, hi = np.percentile(rescaled, [0.1, 99.9])
    hi = max(hi, lo + slope)

    uid = {kind: generate_uid(entropy_srcs=[*uid_entropy, kind]) for kind in ("study", "series", "instance")}
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE_PRESENTATION
    number = patient_id.rsplit("-", 1)[-1]
    days = int(acquisition) * 97 + int(rng.integers(0, 30))
    date = (_BASE_DATE + _dt.timedelta(days=days)).strftime("%Y%m%d")
    time = f"{int(rng.integers(8, 18)):02d}{int(rng.integers(0, 60)):02d}00"
    rows, cols = stored.shape

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid["instance"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid["instance"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = modality
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "holons"
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.InstitutionName = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST PA (synthetic phantom)"
    ds.SeriesDescription = "PA"
    ds.PatientName = f"Phantom^{number}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom; no real patient"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.KVP = f"{int(rng.integers(110, 131))}"
    ds.ExposureTime = int(rng.integers(3, 20))
    ds.Exposure = int(rng.integers(1, 6))
    ds.DistanceSourceToDetector = "1800"
    ds.ImagerPixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    ds.PixelSpacing = ds.ImagerPixelSpacing
    if modality == "DX":
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.StudyInstanceUID = uid["study"]
    ds.SeriesInstanceUID = uid["series"]
    ds.StudyID = f"{acquisition + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{hi - lo + 1:.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.astype("<u2").tobytes()

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
