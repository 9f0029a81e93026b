"""Synthetic karyotypes: single-chromosome images of whole cells, laid out like ``pki3_gband``.

Each of the 24 classes has an ISCN-like relative length and centromere index and its own fixed
band pattern, so type and polarity are learnable exactly as on real karyograms. Cell-to-cell
condensation changes the scale, so length alone does not separate neighbouring classes.

Rendering is vectorised: a chromosome is drawn in a straight (axis, across) frame as two rounded
chromatid tubes joined at the centromere and modulated by the band profile; one
``map_coordinates`` call then bends (constant curvature plus a small S-shaped sway) and rotates
it. Blur and noise follow, and the image is cropped tight like the real crops.

Lab styles (:class:`LabStyle`, :data:`LAB_STYLES`) reproduce how other labs' images look: the
stain and band convention (G, Q, R), magnification, fixed-size padded frames, exposure, camera
noise and JPEG storage. The labels and their meaning (polarity 1 = p arm up) do not change.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from holons.errors import HolonsError
from holons.files import atomic_write

MANIFEST_COLUMNS = (
    "path", "case_id", "slide_id", "cell_no", "class_1to24", "label_0to23", "class_name", "copy",
    "height", "width", "mode", "polarity", "karyotype",
)
STAINS = ("gband", "qband")
DEFAULT_SCALE = 13.2
"""Pixels per 1 % of the haploid autosomal length. With the default bending and condensation the
median crop sizes then follow ``pki3_gband`` (chromosome 1 about 114 x 26 px there 119 x 28,
chromosome 21 about 29 x 17 px there 27 x 18)."""


@dataclass(frozen=True)
class ChromosomeClass:
    """One row of :data:`CHROMOSOME_TABLE`.

    ``bands`` are ``(start, end, darkness)`` with start/end as fractions of the length from the
    p-arm telomere (0) to the q-arm telomere (1) and darkness in [0, 1] (G-band stain uptake).
    """

    class_1to24: int
    name: str
    relative_length: float
    centromere_index: float
    bands: tuple[tuple[float, float, float], ...]

    @property
    def label_0to23(self) -> int:
        return self.class_1to24 - 1

    @property
    def acrocentric(self) -> bool:
        """D and G group (13-15, 21, 22): short arm of stalks and satellites."""
        return self.class_1to24 in _ACROCENTRIC


# Relative length (% of the haploid autosomal length) and centromere index p/(p+q), rounded from
# the classical measurements of G-banded metaphases that ISCN tabulates (ISCN 1978/1985 style
# tables, as reproduced in cytogenetics textbooks). Values vary by a few percent between sources
# and with condensation; they are an approximation, not a reference.
_LENGTH_CI: dict[int, tuple[float, float]] = {
    1: (8.44, 0.48), 2: (8.02, 0.39), 3: (6.83, 0.47), 4: (6.30, 0.29), 5: (6.08, 0.29),
    6: (5.90, 0.39), 7: (5.36, 0.39), 8: (4.93, 0.34), 9: (4.80, 0.35), 10: (4.59, 0.33),
    11: (4.61, 0.40), 12: (4.66, 0.30), 13: (3.74, 0.17), 14: (3.56, 0.19), 15: (3.46, 0.20),
    16: (3.36, 0.41), 17: (3.25, 0.34), 18: (2.93, 0.31), 19: (2.67, 0.47), 20: (2.56, 0.45),
    21: (1.90, 0.27), 22: (2.04, 0.28), 23: (5.12, 0.40), 24: (2.15, 0.27),
}

_ACROCENTRIC = frozenset({13, 14, 15, 21, 22})

# Coarse, well-known G-band landmarks added to the procedural patterns (fractions of the length):
# pale regions (1p distal, 17q distal, most of 19 and 22) and dark blocks (1q/16q proximal
# heterochromatin, Yq distal heterochromatin, the dark 22q12 band, Xp21/Xq21).
_PALE: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.0, 0.22),), 17: ((0.70, 1.0),), 19: ((0.0, 0.40), (0.55, 1.0)), 22: ((0.0, 0.45), (0.62, 1.0)),
}
_DARK: dict[int, tuple[tuple[float, float, float], ...]] = {
    1: ((0.50, 0.56, 0.85),), 16: ((0.43, 0.50, 0.80),), 19: ((0.44, 0.52, 0.75),),
    22: ((0.48, 0.58, 0.95),), 23: ((0.17, 0.24, 1.0), (0.60, 0.68, 1.0)), 24: ((0.62, 1.0, 0.9),),
}


def _band_pattern(k: int, relative_length: float, ci: float) -> tuple[tuple[float, float, float], ...]:
    """Alternating light/dark bands for class ``k`` (about 3 bands per % length, ~300-band level).

    Procedural, seeded by the class number only (never by the data seed), so every instance of a
    class shares its pattern. Telomeres and the centromere are pale-grey, acrocentric short arms
    (stalks and satellites) light grey; the landmarks of ``_PALE``/``_DARK`` are laid on top.
    """
    rng = np.random.default_rng(7919 * k + 17)
    n = max(5, int(round(3.0 * relative_length)) | 1)  # odd: starts and ends with a light band
    widths = rng.gamma(4.0, 1.0, n)
    edges = np.concatenate([[0.0], np.cumsum(widths) / widths.sum()])
    dark = np.arange(n) % 2 == 1
    levels = np.where(dark, rng.uniform(0.45, 1.0, n), rng.uniform(0.0, 0.15, n))
    mids = (edges[:-1] + edges[1:]) / 2
    levels = np.where(np.abs(mids - ci) < 0.6 / n, np.minimum(levels, 0.3), levels)
    if k in _ACROCENTRIC:
        levels = np.where(mids < ci, 0.3, levels)
    for a, b in _PALE.get(k, ()):
        levels = np.where((mids >= a) & (mids < b), np.minimum(levels, 0.12), levels)
    bands = [(float(edges[i]), float(edges[i + 1]), float(levels[i])) for i in range(n)]
    for a, b, level in _DARK.get(k, ()):
        bands = _overlay(bands, a, b, level)
    return tuple(bands)


def _overlay(bands: list, a: float, b: float, level: float) -> list:
    """Replace the interval [a, b) of a band list by one band of ``level``."""
    out = []
    for s, e, v in bands:
        if e <= a or s >= b:
            out.append((s, e, v))
            continue
        if s < a:
            out.append((s, a, v))
        if e > b:
            out.append((b, e, v))
    out.append((a, b, level))
    return sorted(out)


def _build_table() -> tuple[ChromosomeClass, ...]:
    rows = []
    for k in range(1, 25):
        rel, ci = _LENGTH_CI[k]
        name = {23: "X", 24: "Y"}.get(k, str(k))
        rows.append(ChromosomeClass(k, name, rel, ci, _band_pattern(k, rel, ci)))
    return tuple(rows)


CHROMOSOME_TABLE: tuple[ChromosomeClass, ...] = _build_table()
"""24 rows, index ``class_1to24 - 1`` (23 = X, 24 = Y): relative length (% of the haploid autosomal
length, ISCN-like), centromere index p/(p+q), and a class-specific band pattern. Lengths and
centromere indices are rounded classical ISCN-style measurements; the band patterns are
procedural (class-seeded) with a few real G-band landmarks, not the ISCN ideograms."""
_MARGIN = 2  # empty pixels around the straight chromosome
_BAND_ARRAYS = tuple(np.asarray(r.bands, dtype=np.float64) for r in CHROMOSOME_TABLE)


# --------------------------------------------------------------------------- one chromosome
def render_chromosome(
    rng: np.random.Generator,
    class_1to24: int,
    *,
    scale: float = DEFAULT_SCALE,
    stain: str = "gband",
    polarity: int = 1,
    bend: float | None = None,
    rotation_deg: float | None = None,
    blur: float | None = None,
    contrast: float | None = None,
    noise: float = 0.03,
    band_inversion: bool = False,
) -> np.ndarray:
    """One chromosome as a tightly cropped uint8 image.

    ``scale`` is pixels per 1 % relative length (cell condensation multiplies it). Polarity 1 is
    upright (p arm up, q arm down); polarity 0 is the vertical flip. G-band: dark bands on a light
    chromosome, background exactly 255; Q-band: bright on black, background 0. ``bend`` (total
    bend angle in radians), ``rotation_deg``, ``blur`` (Gaussian sigma, px) and ``contrast`` are
    drawn from ``rng`` when None. ``band_inversion`` maps every band's darkness d to 1 - d (R-bands:
    the reverse of G-bands); it draws nothing extra, so the shape is that of the uninverted render.
    """
    if not 1 <= class_1to24 <= 24:
        raise ValueError(f"class_1to24 must be in 1..24, got {class_1to24}")
    if stain not in STAINS:
        raise ValueError(f"stain must be one of {STAINS}, got {stain!r}")
    if polarity not in (0, 1):
        raise ValueError(f"polarity must be 0 or 1, got {polarity}")
    row = CHROMOSOME_TABLE[class_1to24 - 1]
    u = rng.random(6)  # one draw for the instance's small random choices, kept in a fixed order

    length = scale * row.relative_length * math.exp(0.1 * (2 * u[0] - 1))  # homologues differ a little
    r0 = 0.35 * scale * (row.relative_length / 5.0) ** 0.12 * (0.92 + 0.16 * u[1])
    centro = length * (row.centromere_index + 0.02 * (u[2] - 0.5))
    straight = _straight_density(rng, row, length, r0, centro, band_inversion)

    if bend is None:
        bend = min(max(float(rng.normal(0.0, 0.45)), -1.5), 1.5)
    if rotation_deg is None:
        rotation_deg = float(rng.normal(0.0, 3.0))
    sway = (u[3] - 0.5) * 0.10 * length
    dens = _warp(straight, length, bend, math.radians(rotation_deg), sway)

    if blur is None:
        blur = 0.6 + 0.4 * u[4]
    dens = ndimage.gaussian_filter(dens, blur, truncate=2.5)
    fg = dens > 0.08
    dens += np.float32(noise) * rng.standard_normal(dens.shape, dtype=np.float32)
    rows_any, cols_any = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    if rows_any.size == 0:
        raise RuntimeError("rendered an empty chromosome")  # not reachable for valid parameters
    y0, y1 = max(rows_any[0] - 1, 0), rows_any[-1] + 2
    x0, x1 = max(cols_any[0] - 1, 0), cols_any[-1] + 2
    dens, fg = dens[y0:y1, x0:x1], fg[y0:y1, x0:x1]

    if contrast is None:
        contrast = 0.85 + 0.15 * u[5]
    img = dens * np.float32(255.0 * contrast)
    if stain == "gband":
        np.subtract(np.float32(255.0), img, out=img)
    img[~fg] = 255.0 if stain == "gband" else 0.0
    img = np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)
    if bend < 0:
        img = img[:, ::-1]
    if polarity == 0:
        img = img[::-1]
    return np.ascontiguousarray(img)


def _straight_density(rng: np.random.Generator, row: ChromosomeClass, length: float, r0: float,
                      centro: float, band_inversion: bool = False) -> np.ndarray:
    """Stain density (0 = none) on a straight grid: axis rows (p telomere first) x across columns."""
    m = _MARGIN
    s = np.arange(int(np.ceil(length)) + 2 * m, dtype=np.float32)[:, None] - m + 0.5
    half = int(np.ceil(2.0 * r0)) + m
    t = np.arange(-half, half + 1, dtype=np.float32)[None, :]

    g = np.exp(-(((s - centro) / (0.9 * r0)) ** 2))           # centromere constriction
    r = r0 * (1.0 - 0.35 * g)
    if row.acrocentric:
        r = np.where(s < centro - 0.5 * r0, 0.75 * r, r)      # thin stalk-like short arm
    offset = 0.62 * r0 * (1.0 - 0.9 * g)                      # chromatids meet at the centromere
    ds = np.maximum(np.maximum(r0 - s, s - (length - r0)), 0.0) / r0   # rounded telomeres
    ds2 = ds * ds
    tube_a = 1.0 - ((t - offset) / r) ** 2 - ds2
    tube_b = 1.0 - ((t + offset) / r) ** 2 - ds2
    shape = np.clip(np.maximum(tube_a, tube_b, out=tube_a), 0.0, 1.0, out=tube_a) ** np.float32(0.3)

    band = _band_profile(rng, row, s[:, 0] / length, band_inversion)
    light = 0.40 + 0.12 * rng.random()
    stain = light + (1.0 - light) * band
    coarse = np.float32(0.14) * rng.standard_normal((s.shape[0] // 3 + 2, t.shape[1] // 3 + 2), np.float32)
    texture = np.repeat(np.repeat(coarse, 3, 0), 3, 1)[: s.shape[0], : t.shape[1]]
    return (shape * (stain[:, None] * (1.0 + texture))).astype(np.float32)


def _band_profile(rng: np.random.Generator, row: ChromosomeClass, u: np.ndarray,
                  inverted: bool = False) -> np.ndarray:
    """The class band pattern sampled at axis fractions ``u`` with small per-instance jitter;
    ``inverted`` turns each darkness d into 1 - d after the jitter (same random draws)."""
    bands = _BAND_ARRAYS[row.class_1to24 - 1]
    n = len(bands)
    widths = (bands[:, 1] - bands[:, 0]) * np.exp(rng.normal(0.0, 0.12, n))
    cum = np.cumsum(widths)
    edges = cum[:-1] / cum[-1]  # inner band boundaries
    levels = np.minimum(np.maximum(bands[:, 2] * (1.0 + rng.normal(0.0, 0.08, n)), 0.0), 1.0)
    if inverted:
        levels = 1.0 - levels
    profile = levels[np.searchsorted(edges, u, side="right")].astype(np.float32)
    return np.convolve(np.pad(profile, 1, mode="edge"), np.array([0.25, 0.5, 0.25], np.float32), "valid")


def _warp(straight: np.ndarray, length: float, bend: float, theta: float, sway: float) -> np.ndarray:
    """Bend the straight chromosome along a circular arc of total angle ``|bend|``, sway it sideways
    by ``sway * sin(2 pi s / L)`` and rotate it by ``theta``: one inverse map, one resampling."""
    radius = length / max(abs(bend), 1e-3)
    m_s, c_t = _MARGIN - 0.5, (straight.shape[1] - 1) / 2.0  # row i: axis i - m_s; column j: across j - c_t
    # forward map of the outline to find the output box
    phi = np.linspace(-0.5, 0.5, 9)[:, None] * (length / radius)
    tt = np.array([-c_t - abs(sway), c_t + abs(sway)])[None, :]
    px = radius * (1.0 - np.cos(phi)) + tt * np.cos(phi)
    py = radius * np.sin(phi) - tt * np.sin(phi)
    cth, sth = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    qx, qy = cth * px - sth * py, sth * px + cth * py
    x = np.arange(np.floor(qx.min()) - 2, np.ceil(qx.max()) + 3, dtype=np.float32)[None, :]
    y = np.arange(np.floor(qy.min()) - 2, np.ceil(qy.max()) + 3, dtype=np.float32)[:, None]
    # inverse map: output pixel -> (axis s, across t); the arc centre is (radius, 0) before rotation.
    # t = radius - |p - centre| is computed as a ratio without cancellation so float32 suffices.
    bx, by = cth * x + sth * y, cth * y - sth * x
    r = np.float32(radius)
    q = r - bx
    coords = np.empty((2, y.shape[0], x.shape[1]), np.float32)
    s = np.multiply(np.arctan2(by, q), r, out=coords[0])
    s += np.float32(length / 2)
    t = np.divide(bx * (r + q) - by * by, r + np.sqrt(q * q + by * by), out=coords[1])
    t -= np.float32(sway) * np.sin(s * np.float32(2 * np.pi / length))
    s += np.float32(m_s)
    t += np.float32(c_t)
    return ndimage.map_coordinates(straight, coords, order=1, cval=0.0, prefilter=False)


# --------------------------------------------------------------------------- lab styles
@dataclass(frozen=True)
class LabStyle:
    """How one lab's chromosome images look; :func:`render_cell` and the writer apply it.

    ``stain``: ``gband`` (dark on white) or ``qband`` (bright on black). ``band_inversion``: band
    darkness d becomes 1 - d (R-banding). ``magnification`` multiplies the scale (px per % length).
    ``frame``: ``(height, width)`` of a fixed canvas, or None for a tight crop; the chromosome is
    centred in it, moved by up to ``frame_jitter`` px each way, and shrunk (aspect kept) when it
    does not fit inside the frame less that jitter. ``intensity_scale`` multiplies every pixel
    (exposure), ``black_level`` is added to every pixel and ``background_noise`` is the sigma (gray
    levels) of Gaussian camera noise on the whole image, padding included. ``jpeg_quality``: store
    as JPEG (``.jpg``) at that quality, or PNG when None.
    """

    stain: str = "gband"
    band_inversion: bool = False
    magnification: float = 1.0
    frame: tuple[int, int] | None = None
    frame_jitter: int = 3
    intensity_scale: float = 1.0
    black_level: float = 0.0
    background_noise: float = 0.0
    jpeg_quality: int | None = None
    summary: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.stain not in STAINS:
            raise HolonsError(f"style stain must be one of {', '.join(STAINS)}, got {self.stain!r}")
        if not self.magnification > 0 or not self.intensity_scale > 0:
            raise HolonsError("style magnification and intensity_scale must be positive")
        if self.background_noise < 0 or self.frame_jitter < 0:
            raise HolonsError("style background_noise and frame_jitter must not be negative")
        if self.frame is not None and (len(self.frame) != 2 or min(self.frame) <= 2 * self.frame_jitter):
            raise HolonsError(f"style frame must be (height, width), each larger than twice the jitter, "
                              f"got {self.frame}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            raise HolonsError(f"style jpeg_quality must be in 1..95, got {self.jpeg_quality}")

    @property
    def background(self) -> int:
        """Gray level of the empty slide before exposure and noise: 255 (G-band) or 0 (Q-band)."""
        return 255 if self.stain == "gband" else 0

    @property
    def suffix(self) -> str:
        return ".png" if self.jpeg_quality is None else ".jpg"


LAB_STYLES: dict[str, LabStyle] = {
    "gband": LabStyle(summary="G-band, dark on white, tight crop (pki-3 like; the default)"),
    "qband": LabStyle(stain="qband",
                      summary="Q-band, bright on black, tight crop (the same as --stain qband)"),
    "rband": LabStyle(band_inversion=True, summary="R-band: dark on white, band darkness reversed from G"),
    "padded": LabStyle(frame=(200, 100), summary="G-band centred in fixed 200x100 (h x w) white frames"),
    "qband_padded_dim": LabStyle(
        stain="qband", frame=(200, 100), intensity_scale=0.43, black_level=4.0, background_noise=2.5,
        summary="Q-band in fixed 200x100 black frames, dim (max ~110/255), camera noise",
    ),
    "magnified": LabStyle(magnification=1.6, summary="G-band tight crop at 1.6x the magnification"),
    "jpeg": LabStyle(frame=(242, 242), jpeg_quality=75,
                     summary="G-band in 242x242 white frames, stored as JPEG quality 75 (.jpg)"),
}
"""Named lab styles. ``gband`` renders exactly what the generator wrote before styles existed."""


def resolve_style(style: str | LabStyle | None = None, stain: str | None = None) -> tuple[str, LabStyle]:
    """``(name, LabStyle)`` from a style name or object and/or the older ``stain`` argument.

    No style: the stain's own style (``gband`` when neither is given). A stain that contradicts the
    style's is an error; a :class:`LabStyle` object is named ``custom``.
    """
    if stain is not None and stain not in STAINS:
        raise HolonsError(f"stain must be one of {', '.join(STAINS)}, got {stain!r}")
    if style is None:
        name = stain or "gband"
        return name, LAB_STYLES[name]
    if isinstance(style, LabStyle):
        name, lab = "custom", style
    elif style in LAB_STYLES:
        name, lab = style, LAB_STYLES[style]
    else:
        raise HolonsError(f"unknown style {style!r}; choose one of {', '.join(LAB_STYLES)}")
    if stain is not None and stain != lab.stain:
        raise HolonsError(f"stain {stain!r} conflicts with style {name!r} (a {lab.stain} style); "
                          "give the style only")
    return name, lab


def apply_lab_style(rng: np.random.Generator, img: np.ndarray, style: LabStyle) -> np.ndarray:
    """Frame, exposure and camera noise of ``style`` on one rendered chromosome (uint8 in and out).

    Draws from ``rng`` only what the style needs (none for a tight, noise-free crop). Stain, band
    inversion and magnification act in the rendering; JPEG storage in the writer.
    """
    if style.frame is not None:
        img = _place_in_frame(rng, img, style.frame, style.frame_jitter, style.background)
    if style.intensity_scale == 1.0 and style.black_level == 0.0 and style.background_noise == 0.0:
        return img
    out = img.astype(np.float32) * np.float32(style.intensity_scale) + np.float32(style.black_level)
    if style.background_noise > 0:
        out += np.float32(style.background_noise) * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(np.rint(out), 0.0, 255.0).astype(np.uint8)


def _place_in_frame(rng: np.random.Generator, img: np.ndarray, frame: tuple[int, int], jitter: int,
                    background: int) -> np.ndarray:
    """``img`` centred on a ``frame``-sized canvas of ``background``, offset by up to ``jitter`` px
    each way; shrunk first (aspect kept) when larger than the frame less the jitter."""
    fh, fw = frame
    room_h, room_w = fh - 2 * jitter, fw - 2 * jitter
    h, w = img.shape
    if h > room_h or w > room_w:
        f = min(room_h / h, room_w / w)
        h, w = max(1, int(h * f)), max(1, int(w * f))
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.LANCZOS))
    dy, dx = rng.integers(-jitter, jitter + 1, size=2)
    y0 = min(max((fh - h) // 2 + int(dy), 0), fh - h)
    x0 = min(max((fw - w) // 2 + int(dx), 0), fw - w)
    canvas = np.full((fh, fw), background, np.uint8)
    canvas[y0: y0 + h, x0: x0 + w] = img
    return canvas


# --------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class CellPlan:
    """One synthetic cell: where it goes and which chromosomes it holds."""

    index: int
    case_id: str
    slide_id: str
    cell_no: int
    karyotype: str
    counts: tuple[int, ...]  # copies of class 1..24


_ABNORMALITIES = ("+21", "+18", "+13", "45,X", "47,XXY", "-k")
_ABNORMAL_WEIGHTS = (0.30, 0.10, 0.08, 0.15, 0.10, 0.27)


def cell_counts(rng: np.random.Generator, abnormal: bool) -> tuple[str, tuple[int, ...]]:
    """A karyotype string (ISCN short form) and the copies of classes 1..24 it implies."""
    counts = [2] * 22 + [2, 0]
    male = bool(rng.random() < 0.5)
    if male:
        counts[22], counts[23] = 1, 1
    extras: list[str] = []
    if abnormal:
        kind = _ABNORMALITIES[rng.choice(len(_ABNORMALITIES), p=_ABNORMAL_WEIGHTS)]
        if kind == "45,X":
            counts[22], counts[23] = 1, 0
        elif kind == "47,XXY":
            counts[22], counts[23] = 2, 1
        elif kind == "-k":
            k = int(rng.integers(1, 23))
            counts[k - 1] -= 1
            extras.append(f"-{k}")
        else:
            counts[int(kind[1:]) - 1] += 1
            extras.append(kind)
    sex = "X" * counts[22] + "Y" * counts[23]
    return ",".join([str(sum(counts)), sex, *extras]), tuple(counts)


def parse_karyotype(karyotype: str) -> tuple[int, ...]:
    """Copies of classes 1..24 declared by a short ISCN string such as ``47,XY,+21`` or ``45,X``."""
    parts = karyotype.split(",")
    counts = [2] * 22 + [parts[1].count("X"), parts[1].count("Y")]
    for p in parts[2:]:
        k = int(p[1:])
        counts[k - 1] += 1 if p[0] == "+" else -1
    if sum(counts) != int(parts[0]):
        raise ValueError(f"karyotype {karyotype!r}: declared total does not match the listed changes")
    return tuple(counts)


def plan_cells(cases: int, seed: int, abnormal_rate: float) -> list[CellPlan]:
    """Cells grouped on slides of one or two cells (mostly two) so slide-level splits are exercised."""
    rng = np.random.default_rng([seed, 0xCE11])
    plans: list[CellPlan] = []
    slide = 0
    while len(plans) < cases:
        per_slide = 2 if rng.random() < 0.7 else 1
        for cell_no in range(1, per_slide + 1):
            if len(plans) == cases:
                break
            karyotype, counts = cell_counts(rng, abnormal=bool(rng.random() < abnormal_rate))
            slide_id = f"syn{slide:05d}"
            case_id = f"{slide_id}.{cell_no:02d}"
            plans.append(CellPlan(len(plans), case_id, slide_id, cell_no, karyotype, counts))
        slide += 1
    return plans


def render_cell(
    rng: np.random.Generator, counts: Sequence[int], *, stain: str | None = None, flip_rate: float = 0.5,
    scale: float = DEFAULT_SCALE, style: str | LabStyle | None = None,
) -> list[tuple[int, int, int, np.ndarray]]:
    """All chromosomes of one cell as ``(class_1to24, copy, polarity, image)``.

    The cell's condensation (lognormal, ~12 %) scales every chromosome; blur and contrast are
    shared by the cell with small per-chromosome changes, as on one metaphase spread. ``style``
    (a :data:`LAB_STYLES` name or a :class:`LabStyle`; default from ``stain``, else ``gband``) is
    applied after all chromosomes are rendered, so framing and noise leave the chromosomes' own
    random draws, and hence their shapes, as in the tight-crop style.
    """
    lab = resolve_style(style, stain)[1]
    cell_scale = scale * lab.magnification * float(np.exp(rng.normal(0.0, 0.12)))
    cell_blur, cell_contrast = rng.uniform(0.55, 0.95), rng.uniform(0.85, 1.0)
    out = []
    for k in range(1, 25):
        for copy in range(counts[k - 1]):
            polarity = 0 if rng.random() < flip_rate else 1
            img = render_chromosome(
                rng, k, scale=cell_scale, stain=lab.stain, polarity=polarity,
                blur=cell_blur * rng.uniform(0.9, 1.1), contrast=cell_contrast,
                band_inversion=lab.band_inversion,
            )
            out.append((k, copy, polarity, img))
    return [(k, copy, polarity, apply_lab_style(rng, img, lab)) for k, copy, polarity, img in out]


KARYOGRAM_ROWS = (
    (1, 2, 3, 4, 5), (6, 7, 8, 9, 10, 11, 12, 23), (13, 14, 15, 16, 17, 18), (19, 20, 21, 22, 24),
)


def karyogram(
    chromosomes: Sequence[tuple[int, np.ndarray]], *, stain: str = "gband", gap: int = 6,
    label_space: int = 12,
) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Arrange ``(class_1to24, image)`` pairs in the classical karyogram rows (1-5, 6-12 X, 13-18,
    19-22 Y), bottoms aligned per row, for viewing.

    Returns the uint8 canvas and, per class, the (x, y) pixel where its label belongs (centred
    under the group, in the ``label_space`` left below each row).
    """
    bg = 255 if stain == "gband" else 0
    by_class: dict[int, list[np.ndarray]] = {}
    for k, img in chromosomes:
        by_class.setdefault(k, []).append(img)
    strips, labels, top = [], {}, 0
    for row in KARYOGRAM_ROWS:
        h = max([im.shape[0] for k in row for im in by_class.get(k, [])] + [10])
        strip_h = gap + h + label_space
        tiles, x0 = [], 0
        for k in row:
            group = by_class.get(k, [])
            w = max(sum(im.shape[1] for im in group) + gap * (len(group) - 1), 10) + 3 * gap
            tile = np.full((strip_h, w), bg, np.uint8)
            x = (w - sum(im.shape[1] + gap for im in group) + gap) // 2
            for im in group:
                tile[gap + h - im.shape[0]: gap + h, x: x + im.shape[1]] = im
                x += im.shape[1] + gap
            labels[k] = (x0 + w // 2, top + gap + h + label_space // 2)
            tiles.append(tile)
            x0 += w
        strips.append(np.concatenate(tiles, axis=1))
        top += strip_h
    width = max(s.shape[1] for s in strips)
    canvas = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=bg)
                             for s in strips])
    return canvas, labels


# --------------------------------------------------------------------------- dataset
def _write_image(path: Path, img: np.ndarray, jpeg_quality: int | None = None) -> None:
    """Encode (PNG, or JPEG at ``jpeg_quality``) in memory and write with one system call: file
    creation dominates the cost of tiny files."""
    buf = io.BytesIO()
    if jpeg_quality is None:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=jpeg_quality)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, buf.getbuffer())
    finally:
        os.close(fd)


def _write_cell(job: tuple[Path, CellPlan, int, LabStyle, float]) -> list[dict]:
    """Render one cell into ``images/<case>`` (written in a temp folder, renamed when complete)."""
    out, plan, seed, style, flip_rate = job
    rng = np.random.default_rng([seed, plan.index, 0xC0DE])
    final = out / "images" / plan.case_id
    tmp = out / "images" / f".{plan.case_id}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for k, copy, polarity, img in render_cell(rng, plan.counts, style=style, flip_rate=flip_rate):
        rel = Path("images") / plan.case_id / f"clase{k}" / f"clase{k}_{copy}_{plan.case_id}{style.suffix}"
        dest = tmp / f"clase{k}" / rel.name
        if copy == 0:
            dest.parent.mkdir(parents=True)
        _write_image(dest, img, style.jpeg_quality)
        rows.append({
            "path": rel.as_posix(), "case_id": plan.case_id, "slide_id": plan.slide_id,
            "cell_no": plan.cell_no, "class_1to24": k, "label_0to23": k - 1,
            "class_name": CHROMOSOME_TABLE[k - 1].name, "copy": copy, "height": img.shape[0],
            "width": img.shape[1], "mode": "L", "polarity": polarity, "karyotype": plan.karyotype,
        })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return rows


def generate_karyotypes(
    out: str | os.PathLike,
    *,
    cases: int,
    seed: int = 0,
    abnormal_rate: float = 0.1,
    flip_rate: float = 0.5,
    stain: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    style: str | LabStyle | None = None,
) -> Path:
    """Write ``cases`` synthetic cells under ``out`` in the ``pki3_gband`` layout; return the manifest.

    Layout: ``out/images/<case>/clase<k>/clase<k>_<copy>_<case>.png`` (8-bit gray) and
    ``out/manifest.csv`` with the pki3 columns plus ``polarity`` and ``karyotype``. A fraction
    ``abnormal_rate`` of cells carries a count anomaly (trisomy 21/18/13, 45,X, 47,XXY or a lost
    autosome); ``flip_rate`` of the chromosomes are stored flipped (polarity 0). The output is the
    same for a seed whatever ``workers`` is. Each cell folder appears only when complete and the
    manifest is written last, atomically.

    ``style`` names a lab look from :data:`LAB_STYLES` (or is a :class:`LabStyle`); without it the
    ``stain`` (``gband`` by default) picks ``gband`` or ``qband``, and a stain that contradicts the
    style is an error. JPEG styles write ``.jpg`` files; ``height``/``width`` are those of the
    written files. ``out/style.json`` records the style's name and parameters.
    """
    if cases < 1:
        raise HolonsError(f"cases must be at least 1, got {cases}")
    for name, value in (("abnormal rate", abnormal_rate), ("flip rate", flip_rate)):
        if not 0.0 <= value <= 1.0:
            raise HolonsError(f"{name} must be between 0 and 1, got {value}")
    style_name, lab = resolve_style(style, stain)
    out = Path(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HolonsError(f"cannot create output folder {out}: {e.strerror}") from e

    for stale in (out / "images").glob(".*.tmp*"):  # cell folders left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    jobs = [(out, plan, seed, lab, flip_rate) for plan in plan_cells(cases, seed, abnormal_rate)]
    workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    workers = min(workers, max(1, cases // 4))
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    rows: list[dict] = []
    with tqdm(total=cases, desc="karyotypes", unit="cell", disable=not progress) as bar:
        try:
            if workers == 1:
                for job in jobs:
                    rows.extend(_write_cell(job))
                    bar.update()
            else:
                with ProcessPoolExecutor(workers) as pool:
                    for cell_rows in pool.map(_write_cell, jobs, chunksize=4):
                        rows.extend(cell_rows)
                        bar.update()
        except OSError as e:
            raise HolonsError(f"cannot write synthetic karyotypes under {out}: {e.strerror or e}") from e

    with atomic_write(out / "style.json", "w") as f:
        json.dump({"style": style_name, **asdict(lab)}, f, indent=2)
    manifest = out / "manifest.csv"
    import pandas as pd

    with atomic_write(manifest, "w") as f:
        pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_csv(f, index=False)
    return manifest

