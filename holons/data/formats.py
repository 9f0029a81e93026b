"""Image file format detection by content (magic bytes), falling back to the file name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORMATS = ("dicom", "nifti", "png", "jpeg", "tiff", "bmp", "mha", "nrrd")

_SUFFIXES = {
    ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom",
    ".nii": "nifti", ".nii.gz": "nifti",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp",
    ".mha": "mha", ".mhd": "mha", ".nrrd": "nrrd", ".nhdr": "nrrd",
}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def detect_format(path: str | Path) -> str | None:
    """Return one of ``FORMATS`` for ``path``, or None when it is not a known image format.

    Content wins over the extension, so DICOM files without an extension (common in PACS
    exports) and mislabelled files are recognised.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM") and _suffix(path) == ".bmp":
        return "bmp"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head.startswith(b"\x1f\x8b") and _suffix(path) == ".nii.gz":
        return "nifti"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if head.startswith(b"ObjectType") or head.startswith(b"NDims"):
        return "mha"
    by_suffix = _SUFFIXES.get(_suffix(path))
    if by_suffix is not None:
        return by_suffix
    if _looks_like_dicom_without_preamble(head):
        return "dicom"
    return None


# Reasons shared by `holons index` (headers) and `read_image` (pixels), so that one bad file reads
# the same in the manifest and in an error message.
NOT_DICOM_REASON = "not a DICOM file (no DICM preamble / unreadable header)"
DICOM_EMPTY_REASON = "DICOM header truncated or empty (no data elements after the file meta)"
DICOM_HEADER_TRUNCATED_REASON = "DICOM header truncated (unexpected end of file)"
PIXEL_DATA_TRUNCATED_REASON = "truncated pixel data (file shorter than declared)"
PIXEL_DATA_SHORT_REASON = "pixel data shorter than Rows x Columns x frames require"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED_LENGTH = 0xFFFFFFFF


def has_dicom_preamble(path: str | Path) -> bool:
    """Whether ``path`` has the 128-byte preamble followed by ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_content_problem(path: str | Path, ds: Any, *, pixels_follow: bool = False) -> str | None:
    """Why the data set pydicom just parsed from ``path`` (``force=True``, elements not yet
    accessed) is not a whole DICOM file's, or None.

    ``force=True`` parses any bytes: a text file named ``.dcm`` becomes a data set of unknown tags.
    Without the ``DICM`` preamble, a DICOM file's data set holds at least one element of the
    standard dictionary outside the command (0000) and file meta (0002) groups, else the file is not
    DICOM at all; with it, a file without any data element was cut before its data set (or holds
    none). A file cut inside an element leaves that last element shorter than its declared length:
    the pixel data, or the header (when no pixel data came before it). ``pixels_follow``: the data
    set was read with ``stop_before_pixels`` and a pixel data element follows it.
    """
    from pydicom.datadict import dictionary_has_tag

    tags = list(ds.keys())
    data_set = [t for t in tags if t.group not in (0x0000, 0x0002)]
    if not pixels_follow and not any(dictionary_has_tag(t) for t in data_set):
        if not has_dicom_preamble(path):
            return NOT_DICOM_REASON
        if not data_set:
            return DICOM_EMPTY_REASON
        # DICM and private elements only: a DICOM object (left to the checks that follow)
    if not tags:
        return None
    last = ds.get_item(tags[-1])
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if not (isinstance(length, int) and length != _UNDEFINED_LENGTH and isinstance(value, bytes)
            and len(value) < length):
        return None
    if int(tags[-1]) in _PIXEL_TAGS:
        return PIXEL_DATA_TRUNCATED_REASON
    # a cut element after the pixel data is trailing junk the pixels may survive: left to the decoder
    return None if any(int(t) in _PIXEL_TAGS for t in tags) else DICOM_HEADER_TRUNCATED_REASON


def _looks_like_dicom_without_preamble(head: bytes) -> bool:
    """Raw DICOM data sets (no preamble / file meta) start with a group 0008 (or 0002) tag."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)
