"""Header-only reading of image files: what an archive index needs, without decoding any pixels.

``read_header`` returns the size, photometric interpretation, DICOM attributes and the *raw* patient, study
and series ids (the caller pseudonymizes them before they go anywhere). Files that are readable but hold no
image (DICOMDIR, structured reports, RT plans, presentation states, ...) come back with ``skip`` set to a
reason; files that cannot be read raise ``HeaderError`` whose ``reason`` says why in words and never carries
a header value or the file's path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR

from holons.data.formats import (
    DICOM_HEADER_TRUNCATED_REASON,
    PIXEL_DATA_SHORT_REASON,
    PIXEL_DATA_TRUNCATED_REASON,
    dicom_content_problem,
)

HEADER_FIELDS = (
    "format", "modality", "body_part", "view_position", "rows", "cols", "photometric", "bits_stored",
    "transfer_syntax", "raw_patient_id", "raw_study_id", "raw_series_id", "skip",
)

# Modalities whose objects are never images to learn from (structured documents, plans, overlays).
NON_IMAGE_MODALITIES = frozenset({
    "SR", "KO", "PR", "DOC", "REG", "SEG", "RWV", "FID", "PLAN", "AU", "ECG", "HD", "RESP", "OT-PDF",
})
_NON_IMAGE_SOP_WORDS = (
    ("Presentation State", "presentation state"), (" SR ", "structured report"),
    ("Key Object Selection", "key object selection"), ("Encapsulated", "encapsulated document"),
    ("Color Palette", "color palette"), ("Raw Data", "raw data"), ("Waveform", "waveform"),
)
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN")
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIL_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16,
             "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_PIL_PHOTOMETRIC = {"P": "PALETTE COLOR", "RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK", "YCbCr": "YBR_FULL"}


class HeaderError(Exception):
    """A file's header cannot be read; ``reason`` is a short PHI-free explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_header(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """Read the header of ``path`` (``fmt`` as from ``detect_format``) into a dict keyed by ``HEADER_FIELDS``.

    For NIfTI / MHA / NRRD, ``cols`` is the first (x) axis and ``rows`` the second (y) axis, as in DICOM.
    Raises ``HeaderError`` when the file cannot be read.
    """
    readers = {"dicom": _read_dicom, "png": _read_pil, "jpeg": _read_pil, "tiff": _read_pil, "bmp": _read_pil,
               "nifti": _read_nifti, "mha": _read_itk, "nrrd": _read_itk}
    reader = readers.get(fmt)
    if reader is None:
        raise HeaderError(f"unsupported format {fmt!r}")
    name = "NIfTI" if fmt == "nifti" else fmt.upper()
    header = dict.fromkeys(HEADER_FIELDS, "")
    header.update(format=fmt, rows=0, cols=0, bits_stored=0, skip=None)
    try:
        with _quiet():
            header.update(reader(Path(path)))
    except HeaderError:
        raise
    except OSError as e:
        raise HeaderError(f"{name} header unreadable: {e.strerror or safe_message(e)}") from None
    except Exception as e:  # any library failure on a bad file is recorded, never propagated
        raise HeaderError(f"{name} header unreadable: {safe_message(e)}") from None
    return header


def safe_message(error: BaseException, limit: int = 120) -> str:
    """Exception text without quoted values or paths (they may hold identifiers), cut to ``limit`` chars."""
    text = str(error).splitlines()[0] if str(error) else ""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"(/[^\s/]+)+/?", "…", text)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:limit]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library warnings and pydicom's log while reading: their messages may quote header values."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- DICOM
def _read_dicom(path: Path) -> dict[str, Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    with open(path, "rb") as fp:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            except InvalidDicomError as e:
                raise HeaderError(f"not a valid DICOM file: {safe_message(e)}") from None
        stop = fp.tell()
        problem = dicom_content_problem(path, ds, pixels_follow=_pixel_tag_at(fp, stop))
        if problem is not None:
            raise HeaderError(problem)
        if any("end of file" in str(w.message).lower() for w in caught):
            raise HeaderError(DICOM_HEADER_TRUNCATED_REASON)
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        if not syntax:
            syntax = _syntax_from_encoding(ds)
        out = {
            "modality": _text(ds, "Modality").upper(),
            "body_part": _text(ds, "BodyPartExamined").upper(),
            "view_position": _text(ds, "ViewPosition").upper(),
            "rows": _int(ds, "Rows"),
            "cols": _int(ds, "Columns"),
            "photometric": _text(ds, "PhotometricInterpretation").upper(),
            "bits_stored": _int(ds, "BitsStored"),
            "transfer_syntax": syntax,
            "raw_patient_id": _text(ds, "PatientID"),
            "raw_study_id": _text(ds, "StudyInstanceUID"),
            "raw_series_id": _text(ds, "SeriesInstanceUID"),
        }
        out["skip"] = _dicom_non_image(ds, meta, out["modality"])
        if out["skip"] is None:
            if syntax == _DEFLATED:
                has_pixels = _deflated_has_pixels(path)
            else:
                little_endian = ds.original_encoding[1] is not False
                has_pixels = _pixel_element_check(fp, stop, little_endian)
            if not has_pixels:
                out["skip"] = "no pixel data"
            elif out["rows"] <= 0 or out["cols"] <= 0:
                recorded = all(_has_value(ds, k) for k in ("Rows", "Columns"))
                out["skip"] = (f"zero-size image ({out['rows']} x {out['cols']})" if recorded  # as read_image
                               else "no image size (Rows/Columns missing)")
            elif has_pixels is True and syntax in _NATIVE_SYNTAXES:
                raise HeaderError("encapsulated pixel data under an uncompressed transfer syntax")
            elif has_pixels is not True and has_pixels < _native_bytes(ds, out["rows"], out["cols"]):
                raise HeaderError(PIXEL_DATA_SHORT_REASON)
    return out


def _dicom_non_image(ds: Any, meta: Any, modality: str) -> str | None:
    """Why a readable DICOM object is not an image to index, or None."""
    sop = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
    if sop == _DICOMDIR_SOP or 0x00041220 in ds:
        return "DICOMDIR (directory index, not an image)"
    if modality.startswith("RT") or modality in NON_IMAGE_MODALITIES:
        return f"non-image object ({_token(modality)})"
    sop_class = _text(ds, "SOPClassUID") or sop
    if sop_class:
        from pydicom.uid import UID

        name = f" {UID(sop_class).name} "
        for words, label in _NON_IMAGE_SOP_WORDS:
            if words in name:
                return f"non-image object ({label})"
        if name.strip().startswith("RT "):
            return "non-image object (radiotherapy)"
    return None


def _pixel_tag_at(fp: Any, stop: int) -> bool:
    """Whether a pixel data tag (either byte order) starts at ``stop``, where a header read stopped."""
    fp.seek(stop)
    head = fp.read(4)
    if len(head) < 4:
        return False
    tags = ((int.from_bytes(head[0:2], order) << 16) | int.from_bytes(head[2:4], order)
            for order in ("little", "big"))
    return any(tag in _PIXEL_TAGS for tag in tags)


def _pixel_element_check(fp: Any, stop: int, little_endian: bool) -> bool | int:
    """Whether the data set continues with a pixel data element that is fully present in the file.

    Returns False (none), True (encapsulated) or the byte length of native pixel data.

    ``dcmread(stop_before_pixels=True)`` leaves the file positioned at the pixel data tag, or at the end when
    there is none, so the element header can be checked without reading the pixels. A native pixel data
    element shorter than its declared length, or encapsulated data without its closing delimiter, means a
    truncated file.
    """
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    if stop >= size - 8:
        return False
    fp.seek(stop)
    head = fp.read(12)
    order = "little" if little_endian else "big"
    tag = (int.from_bytes(head[0:2], order) << 16) | int.from_bytes(head[2:4], order)
    if tag not in _PIXEL_TAGS:
        return False
    # Explicit VR: tag, VR (OB/OW/...), 2 reserved bytes, 4-byte length. Judged from the bytes, because
    # some files switch VR encoding mid-stream and pydicom follows them.
    if head[4:6] in _PIXEL_VRS and head[6:8] == b"\0\0":
        length, header_len = int.from_bytes(head[8:12], order), 12
    else:
        length, header_len = int.from_bytes(head[4:8], order), 8
    if length == 0xFFFFFFFF:
        fp.seek(max(stop, size - 4096))
        if _SEQUENCE_DELIMITER not in fp.read():
            raise HeaderError("encapsulated pixel data truncated (no sequence delimiter)")
        return True
    if length == 0:
        return False
    if stop + header_len + length > size:
        raise HeaderError(PIXEL_DATA_TRUNCATED_REASON)
    return length


def _native_bytes(ds: Any, rows: int, cols: int) -> int:
    """Bytes that native (uncompressed) pixel data of this size needs; 0 when the tags do not say."""
    bits = _int(ds, "BitsAllocated")
    frames = max(_int(ds, "NumberOfFrames"), 1)
    samples = max(_int(ds, "SamplesPerPixel"), 1)
    if bits <= 0:
        return 0
    if str(_text(ds, "PhotometricInterpretation")).upper().startswith("YBR") and samples == 3:
        return 0  # subsampled YBR_FULL_422 and friends: size depends on subsampling
    return (rows * cols * samples * frames * bits + 7) // 8


def _deflated_has_pixels(path: Path) -> bool:
    """Deflated data sets must be inflated to find the pixel data element (rare syntax; still no decoding)."""
    import pydicom

    ds = pydicom.dcmread(path, defer_size=256, force=True)
    return any(tag in ds for tag in _PIXEL_TAGS)


def _syntax_from_encoding(ds: Any) -> str:
    """The transfer syntax pydicom inferred for a data set without file meta information."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return ""
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"


def _text(ds: Any, keyword: str) -> str:
    """A single-valued text attribute as a clean string ("" when absent or unreadable).

    Plain ASCII values are taken from the raw element bytes: an index reads millions of headers and pydicom's
    per-access conversion (and validation) is most of the cost. Anything else goes through pydicom, so that
    specific character sets decode as pydicom decodes them.
    """
    try:
        raw = ds.get_item(keyword)
        if raw is None:
            return ""
        value = raw.value
        if isinstance(value, bytes) and value.isascii():
            value = value.decode("ascii").split("\\")[0]
        else:
            value = ds.get(keyword, "")
    except Exception:
        return ""
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__len__") and len(value) > 0:
        value = value[0]  # multi-valued: first value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip().strip("\x00").strip()


def _has_value(ds: Any, keyword: str) -> bool:
    """Whether the attribute is present with a non-empty value (without converting it)."""
    try:
        raw = ds.get_item(keyword)
    except Exception:
        return False
    return raw is not None and raw.value not in (None, b"", "")


def _int(ds: Any, keyword: str) -> int:
    """An unsigned short (US) or integer string (IS) attribute; 0 when absent or unreadable."""
    try:
        raw = ds.get_item(keyword)
        if raw is None:
            return 0
        value = raw.value
        vr = getattr(raw, "VR", None) or dictionary_VR(keyword)
        if isinstance(value, bytes) and vr == "US" and len(value) >= 2:
            return int.from_bytes(value[:2], "little" if getattr(raw, "is_little_endian", True) else "big")
        if isinstance(value, bytes) and vr == "IS" and value.isascii():
            text = value.decode("ascii").split("\\")[0].strip(" \x00")
            return int(float(text)) if text else 0
        value = ds.get(keyword, None)
        return int(value) if value not in (None, "") else 0
    except Exception:
        return 0


def _token(value: str) -> str:
    """A coded value made safe for reasons and summaries (letters, digits, _ and space; short)."""
    return re.sub(r"[^A-Z0-9_ ]", "", value.upper())[:16] or "?"


# --------------------------------------------------------------------------- other formats
def _read_pil(path: Path) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as im:  # lazy: parses the header, decodes nothing
        cols, rows = im.size
        mode = im.mode
    return {"rows": rows, "cols": cols, "photometric": _PIL_PHOTOMETRIC.get(mode, "MONOCHROME2"),
            "bits_stored": _PIL_BITS.get(mode, 0)}


def _read_nifti(path: Path) -> dict[str, Any]:
    import nibabel

    header = nibabel.load(str(path)).header  # the data stays an unread proxy
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) < 2 or min(shape[:2]) <= 0:
        raise HeaderError("NIfTI has fewer than two spatial dimensions")
    return {"rows": shape[1], "cols": shape[0], "photometric": "MONOCHROME2",
            "bits_stored": int(header["bitpix"])}


def _read_itk(path: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise HeaderError("image header unreadable by SimpleITK") from None
    size = reader.GetSize()
    if len(size) < 2:
        raise HeaderError("image has fewer than two dimensions")
    components = reader.GetNumberOfComponents()
    bits = {1: 8, 2: 16, 4: 32, 8: 64}.get(_itk_bytes(reader.GetPixelIDValue()), 0)
    return {"rows": int(size[1]), "cols": int(size[0]),
            "photometric": "MONOCHROME2" if components == 1 else "RGB", "bits_stored": bits}


def _itk_bytes(pixel_id: int) -> int:
    import SimpleITK as sitk

    by_type = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
               sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
               sitk.sitkFloat64: 8, sitk.sitkVectorUInt8: 1, sitk.sitkVectorUInt16: 2,
               sitk.sitkVectorFloat32: 4}
    return by_type.get(pixel_id, 0)
