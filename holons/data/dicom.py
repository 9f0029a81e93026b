"""DICOM pixel pipeline: decode -> modality LUT -> VOI -> MONOCHROME1 / INVERSE inversion -> [0, 1].

pydicom does the decoding (native and, through the pylibjpeg plugins, compressed transfer
syntaxes; bits-stored masking, sign, YBR -> RGB), the Modality LUT Sequence, VOI LUT Sequence
and palette colour look-ups. Rescale and window are applied here in float32 because they may
also come from the functional groups of enhanced (multi-frame) objects, and because the window
must tell whether it misses the stored values (then the percentile range is used and recorded).
Colour images (RGB, YBR, palette) become gray by luminance; they have no modality or VOI stage.
No patient identifier is read into ``meta``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from holons.data.formats import dicom_content_problem
from holons.data.image import (
    RadiographImage,
    UnreadableImage,
    apply_voi_policy,
    describe_error,
    luminance,
    percentile_range,
    replace_non_finite,
    scale_to_unit,
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED = ("Rows", "Columns", "BitsAllocated")


def read_dicom(path: str | Path, *, voi: str = "window", frame: int | str = 0) -> RadiographImage:
    """Read one DICOM file (see ``holons.data.read_image``); raises ``UnreadableImage``."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # malformed files warn a lot; failures raise with a reason instead
        try:
            ds = _parse(path)
            problem = dicom_content_problem(path, ds)  # e.g. a text file named .dcm
            if problem is not None:
                raise UnreadableImage(problem, path)
            n_frames = _check_image(ds, path)
        except UnreadableImage as e:
            raise UnreadableImage(_index_reason(path) or e.reason, path) from e
        if frame != "all" and frame >= n_frames:
            raise UnreadableImage(f"frame {frame} requested but the image has {n_frames} frame(s)", path)
        try:
            stored = _decode(ds, path, frame, n_frames)
        except UnreadableImage as e:
            raise UnreadableImage(_index_reason(path) or e.reason, path) from e
        return _to_radiograph(ds, stored, voi, frame, n_frames)


def _index_reason(path: Path) -> str | None:
    """The reason `holons index` records for this file (None when it indexes it as ``ok``).

    Called when a read fails, so that one bad file reads the same in the manifest and in the
    error; failures the header cannot see (pixel decoding) keep the decoder's reason.
    """
    from holons.data.headers import HeaderError, read_header

    try:
        return read_header(path, "dicom")["skip"] or None
    except HeaderError as e:
        return e.reason
    except Exception:  # the header reader must not hide the read's own reason
        return None


def _parse(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, force=True)
    except (EOFError, OSError) as e:
        raise UnreadableImage(f"truncated or malformed DICOM ({describe_error(e)})", path) from e
    except Exception as e:
        raise UnreadableImage(f"unparseable DICOM ({describe_error(e)})", path) from e


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid and hasattr(ds, "file_meta"):
        uid = ds.file_meta.get("MediaStorageSOPClassUID")
    try:
        return UID(str(uid)).name if uid else ""
    except Exception:
        return ""


def _check_image(ds: Dataset, path: Path) -> int:
    """Reject what is not a decodable image; returns the number of frames."""
    file_meta = getattr(ds, "file_meta", Dataset())
    if (
        file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage
        or "DirectoryRecordSequence" in ds
    ):
        raise UnreadableImage("DICOMDIR (a directory of files, not an image)", path)
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        sop = _sop_class(ds)
        raise UnreadableImage("no pixel data" + (f" ({sop})" if sop else ""), path)
    element = ds[keyword]
    if element.is_empty:
        raise UnreadableImage("no pixel data (empty pixel data element)", path)
    for name in _REQUIRED:
        if ds.get(name) is None:
            raise UnreadableImage(f"missing required pixel attribute {name}", path)
    if int(ds.Rows) == 0 or int(ds.Columns) == 0:
        raise UnreadableImage(f"zero-size image ({ds.Rows} x {ds.Columns})", path)
    if "PhotometricInterpretation" not in ds and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"
    encapsulated = bool(element.is_undefined_length)
    _ensure_transfer_syntax(ds, path, encapsulated)
    return _number_of_frames(ds, path, encapsulated, keyword)


def _ensure_transfer_syntax(ds: Dataset, path: Path, encapsulated: bool) -> None:
    """Files without file meta get the syntax they were parsed with; unknown codecs are refused."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        if encapsulated:
            raise UnreadableImage(
                "unsupported transfer syntax: compressed pixel data without a transfer syntax", path
            )
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            implicit, little = True, True
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        return
    tsyntax = UID(str(tsyntax))
    if not tsyntax.is_transfer_syntax:
        raise UnreadableImage(f"unsupported transfer syntax {tsyntax} (unknown to pydicom)", path)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnreadableImage(f"unsupported transfer syntax {tsyntax.name} ({tsyntax})", path) from None
    if not decoder.is_available:
        raise UnreadableImage(
            f"unsupported transfer syntax {tsyntax.name}: no decoder plugin installed", path
        )


def _number_of_frames(ds: Dataset, path: Path, encapsulated: bool, keyword: str) -> int:
    """Number of Frames, repaired from the pixel data length when the tag is unparseable."""
    try:
        value = ds.get("NumberOfFrames", 1)
        return max(int(value if value not in (None, "") else 1), 1)
    except (TypeError, ValueError):
        pass
    if encapsulated:
        raise UnreadableImage("unparseable Number of Frames", path)
    frame_bytes = (
        int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated)
    )
    n_frames = max(len(ds[keyword].value) * 8 // max(frame_bytes, 1), 1)
    ds.NumberOfFrames = n_frames
    return n_frames


def _decode(ds: Dataset, path: Path, frame: int | str, n_frames: int) -> np.ndarray:
    """Stored values: H x W (x S) for one frame, F x H x W (x S) for all; YBR already as RGB."""
    try:
        if frame == "all":
            array = pixel_array(ds)
            if n_frames == 1:
                array = array[None]
        else:
            array = pixel_array(ds, index=int(frame))
    except Exception as e:
        raise UnreadableImage(_decode_reason(e), path) from e
    return array


def _decode_reason(error: Exception) -> str:
    text = str(error).lower()
    if "less than expected" in text or "truncat" in text or "end of" in text or isinstance(error, EOFError):
        return f"truncated pixel data ({describe_error(error)})"
    if isinstance(error, NotImplementedError) or "no pixel data decoders" in text or "plugin" in text:
        return f"undecodable pixel data: unsupported or corrupt encoding ({describe_error(error)})"
    return f"undecodable pixel data ({describe_error(error)})"


def _lookup(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute from the top level, else the per-frame, else the shared functional group."""
    if keyword in ds:
        return ds.get(keyword)
    for group_name, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(group_name)
        if groups and len(groups) > index:
            items = groups[index].get(sequence)
            if items and keyword in items[0]:
                return items[0].get(keyword)
    return None


def _first_float(value: Any) -> float | None:
    """First number of a (multi-)value, or None when missing or unparseable."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        number = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if np.isfinite(number) else None


def _modality(ds: Dataset, stored: np.ndarray, frame: int) -> tuple[np.ndarray, str]:
    """Modality LUT (sequence via pydicom, else rescale slope / intercept); float32 out."""
    if ds.get("ModalityLUTSequence"):
        try:
            return apply_modality_lut(stored, ds).astype(np.float32), "modality LUT sequence"
        except Exception as e:
            return stored.astype(
                np.float32
            ), f"identity (modality LUT sequence unusable: {describe_error(e, 60)})"
    slope = _first_float(_lookup(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first_float(_lookup(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
    values = replace_non_finite(stored.astype(np.float32))
    if slope is None and intercept is None:
        return values, "identity"
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values, f"rescale slope {slope:g} intercept {intercept:g}"


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]; None when the window misses every value."""
    lo, hi = float(values.min()), float(values.max())
    if function == "LINEAR_EXACT" or function == "SIGMOID":
        bottom, top = center - width / 2, center + width / 2
    else:
        if width < 1:
            return None
        bottom, top = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if lo < hi and (top < lo or bottom >= hi):
        return None
    if function == "SIGMOID":
        out = values - np.float32(center)
        out *= np.float32(-4.0 / width)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR_EXACT":
        return scale_to_unit(values, bottom, top)
    if width == 1:
        return (values > bottom).astype(np.float32)
    return scale_to_unit(values, bottom, top)


def _voi(ds: Dataset, values: np.ndarray, voi: str, frame: int) -> tuple[np.ndarray, str, str | None]:
    """VOI stage by policy; returns (pixels in [0, 1], what was applied, fallback reason or None)."""
    if voi != "window":
        return apply_voi_policy(values, voi, None)
    fallback = "no window in file"
    if ds.get("VOILUTSequence"):
        try:
            return _voi_lut(ds, values), "VOI LUT sequence", None
        except _WindowMisses:
            fallback = "VOI LUT misses the stored values"
        except Exception as e:
            fallback = f"VOI LUT sequence unusable ({describe_error(e, 60)})"
    else:
        center = _first_float(_lookup(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
        width = _first_float(_lookup(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
        function = (
            str(_lookup(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper().strip()
        )
        if center is not None and width is not None:
            if width <= 0:
                fallback = f"invalid window width {width:g}"
            else:
                out = _window(values, center, width, function)
                if out is not None:
                    return out, f"window center {center:g} width {width:g} ({function})", None
                fallback = "window misses the stored values"
    lo, hi = percentile_range(values)
    return (
        scale_to_unit(values, lo, hi),
        f"percentile 0.5-99.5 [{lo:g}, {hi:g}] (fallback: {fallback})",
        fallback,
    )


class _WindowMisses(Exception):
    pass


def _voi_lut(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """First VOI LUT of the sequence, scaled by the LUT's own output range."""
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds).astype(np.float32)
    out_lo, out_hi = float(table.min()), float(table.max())
    mapped = apply_voi(np.rint(values).astype(np.int64), ds)
    out = scale_to_unit(mapped, out_lo, out_hi)
    if values.min() < values.max() and out.min() == out.max():
        raise _WindowMisses
    return out


def _pixel_spacing(ds: Dataset, frame: int) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing, else the functional groups."""
    candidates = (
        ("PixelSpacing", ds.get("PixelSpacing")),
        ("ImagerPixelSpacing", ds.get("ImagerPixelSpacing")),
        ("PixelMeasuresSequence", _lookup(ds, frame, "PixelMeasuresSequence", "PixelSpacing")),
    )
    for source, value in candidates:
        try:
            spacing = (float(value[0]), float(value[1]))
        except (TypeError, ValueError, IndexError):
            continue
        if all(np.isfinite(spacing)) and min(spacing) > 0:
            return spacing, source
    return None, None


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    value = str(value).strip() if value is not None else ""
    return value or None


def _to_radiograph(
    ds: Dataset, stored: np.ndarray, voi: str, frame: int | str, n_frames: int
) -> RadiographImage:
    photometric = (_text(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    first = 0 if frame == "all" else int(frame)
    original_shape = (n_frames,) if n_frames > 1 else ()
    original_shape += tuple(stored.shape[-3:] if samples > 1 else stored.shape[-2:])
    inverted = False
    if photometric == "PALETTE COLOR" or samples > 1:
        rgb = apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
        gray = luminance(rgb)
        full = (0.0, float(np.iinfo(rgb.dtype).max)) if rgb.dtype.kind == "u" else None
        if photometric != "PALETTE COLOR" and full is not None:
            bits = int(ds.get("BitsStored", 8 * rgb.dtype.itemsize) or 8 * rgb.dtype.itemsize)
            full = (0.0, float(2 ** min(bits, 8 * rgb.dtype.itemsize) - 1))
        pixels, applied, fallback = apply_voi_policy(gray, voi, full, "full colour range")
        modality = "colour to gray (luminance)"
    else:
        values, modality = _modality(ds, stored, first)
        pixels, applied, fallback = _voi(ds, values, voi, first)
        shape = str(_text(ds, "PresentationLUTShape") or "").upper()
        inverted = photometric == "MONOCHROME1" or shape == "INVERSE"
        if inverted:
            np.subtract(np.float32(1.0), pixels, out=pixels)
    spacing, spacing_source = _pixel_spacing(ds, first)
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    meta = {
        "format": "dicom",
        "original_shape": tuple(int(s) for s in original_shape),
        "pixel_spacing_mm": spacing,
        "pixel_spacing_source": spacing_source,
        "photometric": photometric,
        "modality": _text(ds, "Modality"),
        "body_part": _text(ds, "BodyPartExamined"),
        "view_position": _text(ds, "ViewPosition"),
        "laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        "modality_lut": modality,
        "voi_applied": applied,
        "voi_fallback": fallback,
        "inverted": inverted,
        "frames": n_frames,
        "frame": frame,
        "bits_stored": int(ds.get("BitsStored") or ds.BitsAllocated),
        "bits_allocated": int(ds.BitsAllocated),
        "signed": int(ds.get("PixelRepresentation", 0) or 0) == 1,
        "samples_per_pixel": samples,
        "transfer_syntax": str(tsyntax) if tsyntax else None,
        "sop_class": _sop_class(ds) or None,
    }
    return RadiographImage(np.ascontiguousarray(pixels, dtype=np.float32), meta)
