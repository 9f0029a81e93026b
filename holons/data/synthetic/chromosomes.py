"""One synthetic chromosome: the 24 classes (ISCN-like lengths, centromeres, band patterns) and
their rendering.

Rendering is vectorised: a chromosome is drawn in a straight (axis, across) frame as two rounded
chromatid tubes joined at the centromere and modulated by the band profile; one
``map_coordinates`` call then bends (constant curvature plus a small S-shaped sway) and rotates
it. Blur and noise follow, and the image is cropped tight like the real crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

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

