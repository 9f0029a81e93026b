"""Image file format detection by content (magic bytes), falling back to the file name."""

from __future__ import annotations

from pathlib import Path

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


def _looks_like_dicom_without_preamble(head: bytes) -> bool:
    """Raw DICOM data sets (no preamble / file meta) start with a group 0008 (or 0002) tag."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)
