"""Read any radiograph file into one convention: float32 H x W in [0, 1], bright = dense.

``read_image`` detects the format from the file's content (``holons.data.formats``) and
dispatches to a reader: DICOM (``holons.data.dicom``), NIfTI (nibabel), PNG / JPEG / TIFF /
BMP (Pillow, tifffile as fallback for TIFF), MHA / NRRD (SimpleITK). Every failure is an
``UnreadableImage`` with a reason in words, so long jobs can record it and go on.

Intensity policy (``voi``):

- ``window``: the display range the file states (DICOM window or VOI LUT, NIfTI cal_min/max,
  the full range of 8- and 16-bit PNG/JPEG/TIFF/BMP); where the file states none, or its window
  misses the stored values, the 0.5-99.5 percentile range, recorded in ``meta["voi_fallback"]``.
- ``percentile``: the 0.5-99.5 percentile range of the pixels.
- ``minmax``: the pixels' minimum and maximum.

Array order is H x W (rows, columns). Volumes (NIfTI, 3-D MHA/NRRD) are indexed by voxel axes
(i, j, k) as stored; a 2-D plane of axes (a, b) becomes rows = b, columns = a, as ITK and MONAI
index them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from holons.data.formats import FORMATS, detect_format
from holons.data.image import (
    META_KEYS,
    VOI_POLICIES,
    RadiographImage,
    UnreadableImage,
    VoiPolicy,
    apply_voi_policy,
    describe_error,
    luminance,
    replace_non_finite,
)

# Importable from here as before; the record type, its error and the VOI policy live in holons.data.image.
__all__ = [
    "PROJECTIONS",
    "RadiographImage",
    "UnreadableImage",
    "failure_reason",
    "read_image",
    "validate_read_options",
]

Projection = Literal["slice", "mean", "max"]

PROJECTIONS = ("slice", "mean", "max")
_DEEP_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow modes wider than 8-bit gray


def read_image(
    path: str | Path,
    *,
    voi: VoiPolicy = "window",
    frame: int | Literal["all"] = 0,
    nifti_slice: int | None = None,
    nifti_axis: int = 2,
    nifti_projection: Projection = "slice",
    format: str | None = None,
) -> RadiographImage:
    """Read ``path`` as a radiograph (see the module docstring for the conventions).

    ``frame`` picks one frame of a multi-frame DICOM or multi-page TIFF (``"all"`` stacks them,
    F x H x W). For 3-D volumes, ``nifti_axis`` is the voxel axis across which a slice is taken
    (``nifti_slice``, default the middle one) or projected (``nifti_projection`` mean or max); 4-D
    data uses its first volume. ``format`` overrides detection. Raises ``UnreadableImage``.
    """
    validate_read_options(
        voi=voi,
        frame=frame,
        nifti_axis=nifti_axis,
        nifti_projection=nifti_projection,
        format=format,
        nifti_slice=nifti_slice,
    )
    path = Path(path)
    if not path.exists():
        raise UnreadableImage("file not found", path)
    if not path.is_file():
        raise UnreadableImage("not a regular file", path)
    if path.stat().st_size == 0:
        raise UnreadableImage("empty file (zero bytes)", path)
    fmt = format or detect_format(path)
    if fmt is None:
        raise UnreadableImage("not an image (unknown file format)", path)
    try:
        if fmt == "dicom":
            from holons.data.dicom import read_dicom

            image = read_dicom(path, voi=voi, frame=frame)
        elif fmt == "nifti":
            image = _read_nifti(path, voi, nifti_slice, nifti_axis, nifti_projection)
        elif fmt in ("mha", "nrrd"):
            image = _read_itk(path, fmt, voi, nifti_slice, nifti_axis, nifti_projection)
        else:
            image = _read_pillow(path, fmt, voi, frame)
    except UnreadableImage:
        raise
    except MemoryError as e:
        raise UnreadableImage("image too large for memory", path) from e
    except Exception as e:  # any decoder failure on bad input is the file's problem, not a crash
        raise UnreadableImage(failure_reason(fmt, e), path) from e
    image.meta = {key: image.meta.get(key) for key in META_KEYS}
    return image


def validate_read_options(
    *,
    voi: str,
    frame: Any,
    nifti_slice: int | None,
    nifti_axis: int,
    nifti_projection: str,
    format: str | None,
) -> None:
    """Raise ValueError for option values ``read_image`` does not accept (a caller's bug, not bad input)."""
    if voi not in VOI_POLICIES:
        raise ValueError(f"voi must be one of {VOI_POLICIES}, got {voi!r}")
    if not (frame == "all" or (isinstance(frame, (int, np.integer)) and frame >= 0)):
        raise ValueError(f"frame must be a non-negative int or 'all', got {frame!r}")
    if nifti_axis not in (0, 1, 2):
        raise ValueError(f"nifti_axis must be 0, 1 or 2, got {nifti_axis!r}")
    if nifti_slice is not None and not (isinstance(nifti_slice, (int, np.integer)) and nifti_slice >= 0):
        raise ValueError(f"nifti_slice must be None or a non-negative int, got {nifti_slice!r}")
    if nifti_projection not in PROJECTIONS:
        raise ValueError(f"nifti_projection must be one of {PROJECTIONS}, got {nifti_projection!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


_TRUNCATION_WORDS = (
    "truncated",
    "not enough data",
    "failed to read",
    "ended before",
    "not read completely",
    "less than expected",
    "end of file",
    "unexpected end",
)


def failure_reason(fmt: str, error: BaseException) -> str:
    """Reason for a decoder error: ``truncated (...)`` if it says so, else ``<fmt> decoding failed (...)``."""
    text = str(error).lower()
    truncated = isinstance(error, EOFError) or any(words in text for words in _TRUNCATION_WORDS)
    return f"{'truncated' if truncated else f'{fmt} decoding failed'} ({describe_error(error)})"


def _type_range(dtype: np.dtype) -> tuple[float, float] | None:
    """Full range of 8- and 16-bit unsigned data (display-encoded files); None for other types."""
    if dtype == np.bool_:
        return (0.0, 1.0)
    if dtype in (np.uint8, np.uint16):
        return (0.0, float(np.iinfo(dtype).max))
    return None


def _to_gray(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """``H x W`` or ``H x W x C`` (C = 1, 2 gray+alpha, 3 RGB, 4 RGBA) -> (H x W, was colour)."""
    if array.ndim == 3:
        channels = array.shape[-1]
        if channels >= 3:
            return luminance(array), True
        return array[..., 0], False
    return array, False


# ----------------------------------------------------------------------------- Pillow / tifffile


def _read_pillow(path: Path, fmt: str, voi: str, frame: int | str) -> RadiographImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            n_frames = int(getattr(img, "n_frames", 1))
            indices = range(n_frames) if frame == "all" else [int(frame)]
            if indices[-1] >= n_frames:
                raise UnreadableImage(f"frame {frame} requested but the image has {n_frames} frame(s)", path)
            mode = img.mode
            if fmt == "tiff" and _pillow_narrows_tiff(img):
                return _read_tifffile(path, voi, frame)
            planes = []
            for index in indices:
                img.seek(index)
                planes.append(_pillow_plane(img))
    except UnreadableImage:
        raise
    except UnidentifiedImageError as e:
        if fmt == "tiff":
            return _read_tifffile(path, voi, frame)
        raise UnreadableImage(f"not an image ({fmt} content not recognised)", path) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if fmt == "tiff":
            return _read_tifffile(path, voi, frame)
        raise UnreadableImage(failure_reason(fmt, e), path) from e
    return _finish_2d(path, fmt, planes, voi, frame, n_frames, mode)


def _pillow_narrows_tiff(img) -> bool:
    """Pillow reads deep colour TIFFs (e.g. 16-bit RGB) as 8-bit; tifffile keeps their depth."""
    bits = getattr(img, "tag_v2", {}).get(258) or (8,)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8 and img.mode not in _DEEP_GRAY_MODES


def _pillow_plane(img) -> tuple[np.ndarray, tuple[int, ...], np.dtype]:
    """One page as (gray values, original shape, source dtype); 16-bit and float gray keep their values."""
    mode = img.mode
    if mode in ("L", "1", *_DEEP_GRAY_MODES):
        array = np.asarray(img)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("="))
        if mode == "I" and array.size and array.min() >= 0 and array.max() <= 0xFFFF:
            array = array.astype(np.uint16)  # 16-bit data that Pillow widened
        return array, array.shape, array.dtype
    if mode in ("LA", "La"):
        array = np.asarray(img)
        return array[..., 0], array.shape, array.dtype
    shape = (img.height, img.width, len(img.getbands()))
    if mode not in ("RGB", "RGBA", "RGBX", "P", "PA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    gray = np.asarray(img.convert("L"))  # BT.601 luma, alpha ignored; fast C path for millions of files
    return gray, shape, gray.dtype


def _read_tifffile(path: Path, voi: str, frame: int | str) -> RadiographImage:
    """TIFFs that Pillow cannot decode (16-bit RGB, float, odd compressions)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            n_frames = len(tif.pages)
            indices = range(n_frames) if frame == "all" else [int(frame)]
            if indices[-1] >= n_frames:
                raise UnreadableImage(f"frame {frame} requested but the image has {n_frames} page(s)", path)
            planes = []
            for index in indices:
                page = tif.pages[index]
                array = page.asarray()
                if array.ndim == 3 and page.planarconfig == 2:
                    array = np.moveaxis(array, 0, -1)  # separate colour planes -> H x W x C
                gray, _ = _to_gray(array)
                planes.append((gray, array.shape, array.dtype))
    except UnreadableImage:
        raise
    except Exception as e:
        raise UnreadableImage(failure_reason("tiff", e), path) from e
    return _finish_2d(path, "tiff", planes, voi, frame, n_frames, "tifffile")


def _finish_2d(
    path: Path, fmt: str, planes: list, voi: str, frame, n_frames: int, mode: str
) -> RadiographImage:
    arrays = [plane for plane, _, _ in planes]
    _, original_shape, source_dtype = planes[0]
    if any(a.ndim != 2 for a in arrays) or 0 in arrays[0].shape:
        raise UnreadableImage(f"not a 2-D image (shape {original_shape})", path)
    if len({a.shape for a in arrays}) > 1:
        raise UnreadableImage("frames have different sizes; read them one at a time", path)
    values = replace_non_finite(arrays[0] if len(arrays) == 1 else np.stack(arrays))
    colour = len(original_shape) == 3 and original_shape[-1] >= 3
    pixels, applied, fallback = apply_voi_policy(values, voi, _type_range(source_dtype), "full type range")
    return RadiographImage(
        np.ascontiguousarray(pixels),
        {
            "format": fmt,
            "original_shape": tuple(int(s) for s in original_shape),
            "photometric": f"{'RGB' if colour else 'gray'} ({mode})",
            "voi_applied": applied,
            "voi_fallback": fallback,
            "inverted": False,
            "frames": n_frames,
            "frame": frame,
            "bits_stored": (1 if source_dtype.kind == "b" else 8 * source_dtype.itemsize)
            if source_dtype.kind in "uib"
            else None,
        },
    )


# ----------------------------------------------------------------------------- volumes


def _volume_plane(
    path: Path,
    volume,
    shape: tuple[int, ...],
    spacing: tuple[float, ...] | None,
    index: int | None,
    axis: int,
    projection: str,
) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """Pick the 2-D plane of an (i, j, k[, ...]) voxel array (``volume[...]`` may be lazy).

    Extra dimensions (time, ...) use their first index; a volume with only two non-singleton
    spatial axes is a 2-D image. Returns (rows x columns plane, (row, col) spacing, meta).
    """
    if len(shape) < 2 or 0 in shape:
        raise UnreadableImage(f"not a 2-D or 3-D image (shape {tuple(shape)})", path)
    spatial = list(shape[:3])
    first_volume = (slice(None),) * len(spatial) + (0,) * (len(shape) - len(spatial))
    info: dict[str, Any] = {"slice": None, "projection": None, "axis": None}
    non_singleton = [a for a, n in enumerate(spatial) if n > 1]
    if len(spatial) == 2 or len(non_singleton) <= 2:
        axes = non_singleton if len(non_singleton) == 2 else [0, 1]
        selector = list(first_volume)
        for a in range(len(spatial)):
            if a not in axes:
                selector[a] = 0
        plane = np.asarray(volume[tuple(selector)])
    else:
        axes = [a for a in range(3) if a != axis]
        info["axis"] = axis
        if projection == "slice":
            k = spatial[axis] // 2 if index is None else int(index)
            if not 0 <= k < spatial[axis]:
                raise UnreadableImage(f"slice {k} requested but axis {axis} has {spatial[axis]} slices", path)
            selector = list(first_volume)
            selector[axis] = k
            plane = np.asarray(volume[tuple(selector)])
            info["slice"] = k
        else:
            data = replace_non_finite(np.asarray(volume[first_volume], dtype=np.float32))
            plane = data.mean(axis=axis) if projection == "mean" else data.max(axis=axis)
            info["projection"] = projection
    plane = plane.T  # (a, b) voxel axes -> rows = b, columns = a
    row_col_spacing = None
    if spacing is not None and len(spacing) > max(axes):
        row_col_spacing = (float(spacing[axes[1]]), float(spacing[axes[0]]))
        if not all(np.isfinite(row_col_spacing)) or min(row_col_spacing) <= 0:
            row_col_spacing = None
    return plane, row_col_spacing, info


def _read_nifti(path: Path, voi: str, index: int | None, axis: int, projection: str) -> RadiographImage:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        header = img.header
        zooms = tuple(float(z) for z in header.get_zooms())
        plane, spacing, info = _volume_plane(path, img.dataobj, shape, zooms, index, axis, projection)
    except UnreadableImage:
        raise
    except (EOFError, OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise UnreadableImage(failure_reason("nifti", e), path) from e
    unit = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "unknown"
    if spacing is not None:
        spacing = tuple(s * {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0) for s in spacing)
    values = replace_non_finite(plane)
    display = None
    cal_min, cal_max = (float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0))
    if cal_max > cal_min:
        display = (cal_min, cal_max)
    elif values.dtype == np.uint8:
        display = (0.0, 255.0)
    pixels, applied, fallback = apply_voi_policy(
        values, voi, display, "display range (cal_min/cal_max)" if cal_max > cal_min else "full type range"
    )
    return RadiographImage(
        np.ascontiguousarray(pixels),
        {
            "format": "nifti",
            "original_shape": shape,
            "pixel_spacing_mm": spacing,
            "photometric": "gray",
            "voi_applied": applied,
            "voi_fallback": fallback,
            "inverted": False,
            "frames": 1,
            "frame": 0,
            "bits_stored": int(header.get_data_dtype().itemsize * 8),
            "nifti_slice": info["slice"],
            "nifti_axis": info["axis"],
            "nifti_projection": info["projection"],
        },
    )


def _read_itk(
    path: Path, fmt: str, voi: str, index: int | None, axis: int, projection: str
) -> RadiographImage:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
        array = sitk.GetArrayViewFromImage(img)  # (k, j, i[, components])
        components = img.GetNumberOfComponentsPerPixel()
        if components > 1:
            array = luminance(array) if components >= 3 else array[..., 0]
        voxels = array.transpose()  # (i, j, k) like nibabel
        plane, spacing, info = _volume_plane(
            path, voxels, voxels.shape, img.GetSpacing(), index, axis, projection
        )
        plane = np.array(plane)  # own the memory: the view dies with the ITK image
    except UnreadableImage:
        raise
    except RuntimeError as e:
        raise UnreadableImage(failure_reason(fmt, e), path) from e
    values = replace_non_finite(plane)
    display = (0.0, 255.0) if values.dtype == np.uint8 else None
    pixels, applied, fallback = apply_voi_policy(values, voi, display, "full type range")
    return RadiographImage(
        np.ascontiguousarray(pixels),
        {
            "format": fmt,
            "original_shape": tuple(int(s) for s in reversed(img.GetSize()))
            + ((components,) if components > 1 else ()),
            "pixel_spacing_mm": spacing,
            "photometric": "RGB" if components >= 3 else "gray",
            "voi_applied": applied,
            "voi_fallback": fallback,
            "inverted": False,
            "frames": 1,
            "frame": 0,
            "bits_stored": int(np.dtype(values.dtype).itemsize * 8),
            "nifti_slice": info["slice"],
            "nifti_axis": info["axis"],
            "nifti_projection": info["projection"],
        },
    )
