"""The decoded-image record every reader returns, its error, and the intensity (VOI) policy.

This module sits below the readers: ``holons.data.readers`` (format dispatch; Pillow, tifffile,
NIfTI and ITK readers) and ``holons.data.dicom`` (the DICOM pixel pipeline) both import it. The
readers dispatch to ``holons.data.dicom``; ``holons.data.dicom`` imports nothing from the readers,
so the two form no import cycle.

- ``RadiographImage``: float32 pixels in [0, 1] (bright = dense) and header facts; its ``meta``
  has exactly the keys ``META_KEYS``.
- ``UnreadableImage``: a file that is not a readable image, with a reason in words.
- ``apply_voi_policy`` and its helpers: the ``window`` / ``percentile`` / ``minmax`` policies
  described in ``holons.data.readers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from holons.errors import HolonsError

VoiPolicy = Literal["window", "percentile", "minmax"]
VOI_POLICIES = ("window", "percentile", "minmax")
PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 1 << 20  # pixels; larger images are subsampled on a regular grid for percentiles
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow and DICOM viewers use

# Every meta has exactly these keys (None where a format has no such fact), so metas of any files line up.
META_KEYS = (
    "format", "original_shape", "pixel_spacing_mm", "pixel_spacing_source", "photometric", "modality",
    "body_part", "view_position", "laterality", "modality_lut", "voi_applied", "voi_fallback", "inverted",
    "frames", "frame", "bits_stored", "bits_allocated", "signed", "samples_per_pixel", "transfer_syntax",
    "sop_class", "nifti_slice", "nifti_axis", "nifti_projection",
)  # fmt: skip


class UnreadableImage(HolonsError):
    """A file that is not a readable image; ``reason`` says why in words, ``path`` which file."""

    def __init__(self, reason: str, path: str | Path = ""):
        super().__init__(reason, str(path))
        self.reason = reason
        self.path = str(path)

    def __str__(self) -> str:
        return f"cannot read {self.path}: {self.reason}" if self.path else f"cannot read image: {self.reason}"


@dataclass
class RadiographImage:
    """Decoded pixels (float32, H x W or F x H x W, [0, 1], bright = dense) and header facts (no PHI)."""

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"RadiographImage(shape={tuple(self.pixels.shape)}, format={self.meta.get('format')!r})"


def describe_error(error: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, shortened, for reasons (ITK's source locations dropped)."""
    message = " ".join(str(error).split())
    if "ITK ERROR:" in message:
        message = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\)\s*:?\s*", "", message.split("ITK ERROR:")[-1])
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# ----------------------------------------------------------------------------- intensity


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Gray from the first three channels of a ``... x C`` array (BT.601 weights), float32."""
    return rgb[..., :3].astype(np.float32, copy=False) @ _LUMA


def percentile_range(values: np.ndarray, low: float = PERCENTILES[0], high: float = PERCENTILES[1]):
    """The (low, high) percentiles of ``values``; big arrays are subsampled on a regular grid (fast)."""
    sample = values
    if values.size > _PERCENTILE_SAMPLE and values.ndim >= 2:
        step = int(np.ceil(np.sqrt(values.size / _PERCENTILE_SAMPLE)))
        sample = values[..., ::step, ::step]
    lo, hi = np.percentile(sample, (low, high))
    return float(lo), float(hi)


def scale_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly to [0, 1] and clip, as contiguous float32 (zeros when hi <= lo)."""
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = values.astype(np.float32, copy=True)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_voi_policy(
    values: np.ndarray,
    voi: str,
    display_range: tuple[float, float] | None,
    display_name: str = "display range",
) -> tuple[np.ndarray, str, str | None]:
    """Scale ``values`` to [0, 1] by the policy; returns (pixels, what was applied, fallback reason or None).

    ``display_range`` is the range the file itself states (None when it states none).
    """
    if voi == "minmax":
        lo, hi = float(np.min(values)), float(np.max(values))
        return scale_to_unit(values, lo, hi), f"minmax [{lo:g}, {hi:g}]", None
    fallback = None
    if voi == "window":
        if display_range is not None:
            lo, hi = display_range
            return scale_to_unit(values, lo, hi), f"{display_name} [{lo:g}, {hi:g}]", None
        fallback = "no window in file"
    lo, hi = percentile_range(values)
    applied = f"percentile {PERCENTILES[0]:g}-{PERCENTILES[1]:g} [{lo:g}, {hi:g}]"
    if fallback:
        applied += f" (fallback: {fallback})"
    return scale_to_unit(values, lo, hi), applied, fallback


def replace_non_finite(values: np.ndarray) -> np.ndarray:
    """Float arrays with NaN/inf get them replaced (NaN -> 0, inf -> finite extremes); others unchanged."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
        fill = float(finite.min()) if finite.size else 0.0
        return np.nan_to_num(
            values, nan=fill, posinf=float(finite.max()) if finite.size else 0.0, neginf=fill
        )
    return values
