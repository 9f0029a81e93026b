"""Chromosome preprocessing that follows the chromosome, not the file.

One contract, used at training and at predict time and recorded with every model
(:class:`Preprocessing`):

1. **Stain** (:func:`decide_stain`): dark-on-light (G- and R-band) images are inverted so every
   image is a bright chromosome on a dark background. With ``stain: auto`` it is decided per
   image: the image is split in two intensity classes (Otsu on a lightly smoothed copy), and the
   class that is over-represented on the image border, compared with the interior, is the
   background. This holds for padded frames (the border is all background) and for tight crops
   (the chromosome touches the border at a few points only, the corners are background).
2. **Foreground** (:func:`foreground_mask`): above the background level (median of the border)
   by more than the larger of ``NOISE_SIGMAS`` noise deviations (robust, from the border pixels
   below the level) and ``FOREGROUND_FRACTION`` of the foreground's range, on a lightly smoothed
   image; holes filled, specks much smaller than the largest component dropped. So dim images,
   camera noise on the padding and JPEG ringing do not count as chromosome.
3. **Intensity** (:func:`normalise_intensity`): the background level maps to 0 and the
   foreground's 99.5th percentile to 1, so a dim lab (brightest pixel 110 of 255) and a bright one
   give the same range. Pixels outside the (slightly dilated) foreground are set to 0.
4. **Crop**: the foreground's bounding box; the chromosome's *length* is the box's longest side.
5. **Canvas** (:func:`choose_canvas`): a high percentile of the training chromosomes' lengths
   (not the file sizes: fixed padded frames would otherwise make the chromosome a third of the
   canvas), rounded up to a multiple of 8. A longer chromosome is shrunk to fit and counted.
6. **Scale** (optional, ``scale: cell``): every crop of a cell is resized by ``reference /
   cell median length`` (:func:`cell_scale_factors`), so a model moves between magnifications;
   within a cell the relative lengths, which a cytogeneticist reads, are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from holons.errors import HolonsError

StainName = Literal["gband", "rband", "qband", "auto"]
ScaleNorm = Literal["none", "cell"]
DARK_ON_LIGHT = ("gband", "rband")
CANVAS_MULTIPLE = 8
NOISE_SIGMAS = 4.0
FOREGROUND_FRACTION = 0.06
SPECK_FRACTION = 0.05
"""Components smaller than this share of the largest are noise, dust or JPEG ringing."""
TOP_PERCENTILE = 99.5
MIN_CELL_CHROMOSOMES = 10
"""A cell with fewer chromosomes has no reliable median length; its crops keep their scale."""


class ChromosomeImageError(HolonsError):
    """A chromosome image that cannot be preprocessed (wrong shape, nothing in it)."""


@dataclass(frozen=True)
class Preprocessing:
    """The recorded preprocessing of a karyotype model (written with it, read back at predict).

    ``stain``: how the files look (``gband`` / ``rband``: dark on light, ``qband``: bright on dark,
    ``auto``: decided per image). ``canvas``: side of the square each crop is centred on, source
    pixels. ``scale``: ``none`` or ``cell`` (per-cell length normalization to
    ``reference_length`` px).
    """

    stain: str = "auto"
    canvas: int = 0
    scale: str = "none"
    reference_length: float = 0.0
    canvas_percentile: float = 99.5

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (256-bin histogram)."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(centres[int(np.argmax(between))])


def _ring(shape: tuple[int, int]) -> np.ndarray:
    ring = np.zeros(shape, bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    return ring


def _check(pixels: np.ndarray) -> np.ndarray:
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim != 2:
        raise ChromosomeImageError(f"expected a 2-D gray image, got shape {x.shape}")
    if min(x.shape) < 3:
        raise ChromosomeImageError(f"image of {x.shape[0]} x {x.shape[1]} px is too small for a chromosome")
    return x


def decide_stain(pixels: np.ndarray) -> str:
    """``gband`` (dark on light) or ``qband`` (bright on dark) for one gray image in [0, 1]."""
    x = ndimage.gaussian_filter(_check(pixels), 1.0)
    if float(x.max() - x.min()) < 1e-3:  # flat image: the convention of clean files (white = G-band)
        return "gband" if float(x.mean()) > 0.5 else "qband"
    high = x > _otsu((x - x.min()) / (x.max() - x.min())) * (x.max() - x.min()) + x.min()
    ring = _ring(x.shape)
    on_border, inside = float(high[ring].mean()), float(high[~ring].mean()) if (~ring).any() else 0.5
    if on_border == inside:  # no contrast between border and interior: the border's own level decides
        return "gband" if float(np.median(x[ring])) > float(np.median(x)) else "qband"
    return "gband" if on_border > inside else "qband"


def bright_on_dark(pixels: np.ndarray, stain: str) -> tuple[np.ndarray, str]:
    """Invert dark-on-light images; returns the image and the stain convention applied."""
    x = _check(pixels)
    if stain == "auto":
        stain = decide_stain(x)
    elif stain not in (*DARK_ON_LIGHT, "qband"):
        raise ValueError(f"stain must be gband, rband, qband or auto, got {stain!r}")
    return (1.0 - x if stain in DARK_ON_LIGHT else x), stain


def foreground_mask(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Foreground of a bright-on-dark image: ``(mask, background level, top level)`` (see module doc).

    The background level is the median of the border pixels (background in padded frames, and
    still the majority of the border in tight crops, where the chromosome fills most of the
    interior); the noise is the one-sided spread of the border pixels *below* that level, which a
    chromosome touching the border cannot inflate.
    """
    ring = _ring(x.shape)
    border = x[ring]
    level = float(np.median(border))
    below = level - border[border < level]
    sigma = 1.4826 * float(np.median(below)) if below.size >= 8 else 0.0
    smooth = ndimage.gaussian_filter(x, 0.8)
    above = x[smooth > level + NOISE_SIGMAS * sigma]
    top = float(np.percentile(above, TOP_PERCENTILE)) if above.size else float(x.max())
    if top - level < 1e-3:
        return np.zeros(x.shape, bool), level, top
    threshold = level + max(NOISE_SIGMAS * sigma, FOREGROUND_FRACTION * (top - level))
    mask = ndimage.binary_fill_holes(smooth > threshold)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= SPECK_FRACTION * sizes.max()) + 1
        mask = np.isin(labels, keep)
    return mask, level, top


def normalise_intensity(x: np.ndarray, mask: np.ndarray, level: float, top: float) -> np.ndarray:
    """Background level -> 0, foreground top -> 1; outside the dilated mask 0."""
    span = max(top - level, 1e-3)
    out = np.clip((x - level) / span, 0.0, 1.0).astype(np.float32)
    out[~ndimage.binary_dilation(mask, iterations=1)] = 0.0
    return out


def chromosome_crop(pixels: np.ndarray, stain: str) -> np.ndarray:
    """One file's chromosome: bright on 0, intensity in its own range, cut to its foreground box.

    An image without any foreground is returned whole (normalized), so nothing is silently lost.
    """
    x, _ = bright_on_dark(pixels, stain)
    mask, level, top = foreground_mask(x)
    if not mask.any():
        return np.clip((x - x.min()) / max(float(x.max() - x.min()), 1e-3), 0, 1).astype(np.float32)
    out = normalise_intensity(x, mask, level, top)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, x.shape[0])
    x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, x.shape[1])
    return np.ascontiguousarray(out[y0:y1, x0:x1])


def crop_length(crop: np.ndarray) -> float:
    """The chromosome's length in source pixels: the longest side of its crop."""
    return float(max(crop.shape))


def choose_canvas(lengths: Sequence[float], percentile: float = 99.5, multiple: int = CANVAS_MULTIPLE) -> int:
    """The smallest multiple of ``multiple`` that holds ``percentile`` % of the chromosome lengths."""
    values = np.asarray([v for v in lengths if v and math.isfinite(v)], float)
    if values.size == 0:
        raise ChromosomeImageError("cannot choose a canvas: no chromosome sizes")
    longest = float(np.percentile(values, percentile))
    return int(max(1, math.ceil(longest / multiple)) * multiple)


def cell_scale_factors(lengths: Sequence[float], cases: Sequence[str], reference: float) -> np.ndarray:
    """Per row: ``reference / median length of its cell`` (1 for cells with too few chromosomes)."""
    lengths = np.asarray(lengths, float)
    cases = np.asarray([str(c) for c in cases])
    factors = np.ones(len(lengths))
    for case in np.unique(cases):
        rows = cases == case
        if rows.sum() >= MIN_CELL_CHROMOSOMES:
            factors[rows] = reference / max(float(np.median(lengths[rows])), 1.0)
    return factors


def reference_length(lengths: Sequence[float], cases: Sequence[str]) -> float:
    """The median over cells of each cell's median chromosome length (the training set's scale)."""
    lengths = np.asarray(lengths, float)
    cases = np.asarray([str(c) for c in cases])
    medians = [float(np.median(lengths[cases == c])) for c in np.unique(cases)
               if (cases == c).sum() >= MIN_CELL_CHROMOSOMES]
    return float(np.median(medians)) if medians else float(np.median(lengths))


def resize(x: np.ndarray, width: int, height: int, *, enlarge_bilinear: bool = False) -> np.ndarray:
    """Resize a float image with Pillow on mode F: area filter (BOX), or bilinear when
    ``enlarge_bilinear`` (a box filter enlarges by pixel replication)."""
    from PIL import Image

    mode = Image.Resampling.BILINEAR if enlarge_bilinear else Image.Resampling.BOX
    return np.asarray(Image.fromarray(np.ascontiguousarray(x, np.float32), mode="F").resize(
        (width, height), mode), dtype=np.float32)


def rescale(crop: np.ndarray, factor: float) -> np.ndarray:
    """``crop`` resized by ``factor`` (area filter when shrinking, bilinear when enlarging)."""
    if abs(factor - 1.0) < 1e-3:
        return crop
    h, w = max(1, round(crop.shape[0] * factor)), max(1, round(crop.shape[1] * factor))
    return resize(crop, w, h, enlarge_bilinear=factor > 1)


def place_on_canvas(x: np.ndarray, canvas: int) -> tuple[np.ndarray, bool]:
    """Centre ``x`` (H x W, background 0) on a ``canvas`` square without stretching.

    A chromosome longer than the canvas is shrunk (aspect kept, area filter) to fit; the second
    value says so.
    """
    h, w = x.shape
    shrunk = max(h, w) > canvas
    if shrunk:
        scale = canvas / max(h, w)
        h, w = max(1, min(canvas, round(h * scale))), max(1, min(canvas, round(w * scale)))
        x = resize(x, w, h)
    out = np.zeros((canvas, canvas), np.float32)
    y0, x0 = (canvas - h) // 2, (canvas - w) // 2
    out[y0:y0 + h, x0:x0 + w] = x
    return out, shrunk


def network_input(crop: np.ndarray, canvas: int, size: int, factor: float = 1.0) -> tuple[np.ndarray, bool]:
    """A crop as the ``size x size`` float32 network input: rescaled, centred on the canvas, resized."""
    placed, shrunk = place_on_canvas(rescale(crop, factor), canvas)
    if size != canvas:
        placed = resize(placed, size, size)
    return np.clip(placed, 0.0, 1.0), shrunk
