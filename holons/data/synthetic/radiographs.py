"""Synthetic PA chest radiograph phantoms with exact ground truth, in the layout of JSRT/SCR.

Every structure is a closed parametric contour built from smooth pieces (centripetal
Catmull-Rom curves through anatomical control points). The masks are the contours rasterised
at pixel centres, and the landmarks are points sampled on the same contours, a fixed number per
piece, so landmark ``k`` always sits at the same anatomical place (e.g. right-lung point 21 is
the costophrenic angle) and lies on its mask's border by construction.

Geometry is defined in a canonical frame (x to the image right, y down, both in units of the
image side) and mapped to pixels by a per-image similarity transform (rotation, zoom, shift).
Pixel coordinates are (x, y) with the origin at the centre of the top-left pixel. Patient sides
follow radiographic convention: the patient's right lung is on the image's left, the heart
bulges to the image's right. Bright means dense (bone, heart), dark means air (lungs).

Output layout of ``generate_radiographs(out, ...)``::

    out/images/<id>.png                      8-bit PNG (when "png" in formats)
    out/dicom/<train|val|test>/<id>.dcm      12-bit CR/DX DICOM, by split (when "dicom" in formats)
    out/masks/<structure>/<id>.png           255 inside
    out/landmarks/<RL|LL|H|RCLA|LCLA>/<id>.npy   (N, 2) float64 (x, y) pixel coordinates
    out/landmarks_long.csv                   image,structure,point_index,x,y
    out/image_table.csv                      one row per image: ids, split, findings, paths

The DICOMs stand in for a hospital archive, and they are sorted by split so that pretraining can
index ``dicom/train`` alone: the val / test images, on which correspondence and few-shot
segmentation are evaluated, then never reach a pretraining cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import functools
import io
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from holons.data.splits import index_split
from holons.errors import HolonsError
from holons.files import atomic_write

STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
LANDMARK_KEYS = {"right_lung": "RL", "left_lung": "LL", "heart": "H", "right_clavicle": "RCLA",
                 "left_clavicle": "LCLA"}
# Points per contour piece; the sums are the JSRT/SCR counts 44 / 50 / 26 / 23 / 23.
#   lungs:     apex -> lateral wall -> costophrenic angle | diaphragm -> cardiophrenic angle | medial border
#   heart:     right cardiophrenic angle -> right border | top | left border | bottom (diaphragm)
#   clavicles: lateral end, upper edge -> medial | sternal end | lower edge -> lateral | lateral end
PIECE_COUNTS = {
    "right_lung": (21, 8, 15),
    "left_lung": (21, 6, 23),
    "heart": (6, 6, 6, 8),
    "right_clavicle": (10, 4, 8, 1),
    "left_clavicle": (10, 4, 8, 1),
}
LANDMARK_COUNTS = {s: sum(c) for s, c in PIECE_COUNTS.items()}
CARDIOMEGALY_CTR = 0.5
FIELD_OF_VIEW_MM = 358.4  # JSRT: 2048 px x 0.175 mm; the pixel spacing is this over the image side
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
TABLE_COLUMNS = (
    "id", "patient_id", "split", "acquisition", "sex", "modality", "photometric", "size",
    "pixel_spacing_mm", "ctr", "cardiomegaly", "nodule", "nodule_x", "nodule_y", "nodule_size",
    "nodule_size_mm", "nodule_side", "effusion", "effusion_side", "rotation_deg", "inspiration",
    "image_path", "dicom_path",
)
_DENSE = 600.0  # contour samples per unit length (canonical frame)


class SynthError(HolonsError):
    """Invalid arguments or output folder for a synthetic data generator."""


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Nodule:
    """A round lesion at a fixed place of one lung.

    ``lateral`` is the offset from the midline in thorax half-widths, ``height`` the depth below
    the apex in lung lengths, so the lesion moves with the lung between acquisitions.
    """

    side: str  # "right" | "left" (patient side)
    lateral: float
    height: float
    diameter_mm: float


@dataclass(frozen=True)
class PhantomParams:
    """Anatomy of one patient (first block) and the settings of one acquisition (second block).

    Lengths are in units of the image side in the canonical (unrotated) frame; ``*_f`` values are
    fractions of the lung length measured down from the lung apex.
    """

    sex: str = "M"
    thorax_half_width: float = 0.37
    apex_y: float = 0.09
    lung_length: float = 0.74
    body_fat: float = 0.06
    neck_half_width: float = 0.085
    shoulder_drop: float = 0.0
    ctr: float = 0.44
    heart_right_share: float = 0.32
    heart_top_f: float = 0.48
    heart_bottom_f: float = 0.91
    right_dome: float = 0.035
    left_dome: float = 0.02
    aortic_knob: float = 0.012
    clavicle_tilt: float = 0.0
    rib_spacing: float = 0.066
    arms: bool = True
    gastric_bubble: bool = True
    breasts: bool = False
    anatomy_seed: int = 0
    nodule: Nodule | None = None
    effusion_side: str | None = None
    effusion_height: float = 0.0
    # acquisition
    inspiration: float = 1.0
    rotation_deg: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0
    exposure: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.012
    blur_px: float = 0.5


@dataclass
class Phantom:
    """One rendered phantom.

    ``image`` is float32 H x W in [0, 1], bright = dense; ``masks`` maps each of ``STRUCTURES`` to a
    boolean mask; ``landmarks`` to (N, 2) float64 (x, y) pixel coordinates; ``findings`` holds the
    image-table values (ctr, cardiomegaly, nodule_*, effusion_*); ``contours`` are the pixel-space
    polygons the masks were rasterised from.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    landmarks: dict[str, np.ndarray]
    findings: dict[str, object]
    params: PhantomParams
    contours: dict[str, np.ndarray] = field(default_factory=dict)


def sample_patient(rng: np.random.Generator, *, findings_rate: float = 0.3) -> PhantomParams:
    """Draw one patient's anatomy (and default acquisition settings).

    With probability ``findings_rate`` the patient is abnormal and has one or more of
    cardiomegaly (CTR 0.53-0.62), a lung nodule, a pleural effusion; normal CTRs stay below
    0.48 so the flag never sits on the threshold.
    """
    sex = "F" if rng.random() < 0.5 else "M"
    male = sex == "M"
    abnormal = rng.random() < findings_rate
    kinds = set()
    if abnormal:
        kinds = {k for k in ("cardiomegaly", "nodule", "effusion") if rng.random() < 0.45}
        if not kinds:
            kinds = {("cardiomegaly", "nodule", "effusion")[int(rng.integers(3))]}
    ctr = rng.uniform(0.53, 0.62) if "cardiomegaly" in kinds else rng.uniform(0.38, 0.48)
    params = PhantomParams(
        sex=sex,
        thorax_half_width=rng.uniform(0.35, 0.41) if male else rng.uniform(0.33, 0.39),
        apex_y=rng.uniform(0.07, 0.12),
        lung_length=rng.uniform(0.70, 0.78),
        body_fat=rng.uniform(0.03, 0.10),
        neck_half_width=rng.uniform(0.07, 0.10),
        shoulder_drop=rng.uniform(-0.015, 0.025),
        ctr=float(ctr),
        heart_right_share=rng.uniform(0.28, 0.36),
        heart_top_f=rng.uniform(0.45, 0.51),
        heart_bottom_f=rng.uniform(0.89, 0.93),
        right_dome=rng.uniform(0.025, 0.05),
        left_dome=rng.uniform(0.012, 0.03),
        aortic_knob=rng.uniform(0.0, 0.025),
        clavicle_tilt=rng.uniform(-0.015, 0.02),
        rib_spacing=rng.uniform(0.062, 0.072),
        arms=bool(rng.random() < 0.7),
        gastric_bubble=bool(rng.random() < 0.7),
        breasts=bool(not male and rng.random() < 0.7),
        anatomy_seed=int(rng.integers(2**31)),
    )
    if "nodule" in kinds:
        params = replace(params, nodule=_place_nodule(rng, params))
    if "effusion" in kinds:
        params = replace(params, effusion_side=("right", "left")[int(rng.integers(2))],
                         effusion_height=float(rng.uniform(0.05, 0.11)))
    return params


def vary_acquisition(rng: np.random.Generator, patient: PhantomParams) -> PhantomParams:
    """One acquisition of ``patient``: new rotation, shift, zoom, exposure, contrast, noise, inspiration."""
    return replace(
        patient,
        inspiration=float(rng.uniform(0.96, 1.04)),
        rotation_deg=float(rng.uniform(-5.0, 5.0)),
        shift=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        zoom=float(rng.uniform(0.94, 1.04)),
        exposure=float(rng.uniform(-0.04, 0.04)),
        contrast=float(rng.uniform(0.88, 1.1)),
        gamma=float(rng.uniform(0.8, 1.25)),
        noise=float(rng.uniform(0.005, 0.02)),
        blur_px=float(rng.uniform(0.3, 0.8)),
    )


def _place_nodule(rng: np.random.Generator, params: PhantomParams) -> Nodule:
    """A nodule centre well inside one lung of ``params`` (checked on the canonical contour)."""
    anatomy = _Anatomy(params)
    for _ in range(200):
        side = ("right", "left")[int(rng.integers(2))]
        nodule = Nodule(side, float(rng.uniform(0.3, 0.85)), float(rng.uniform(0.12, 0.8)),
                        float(rng.uniform(8.0, 30.0)))
        contour = anatomy.outlines[f"{side}_lung"].polygon()
        centre = anatomy.nodule_centre(nodule)
        radius = nodule.diameter_mm / FIELD_OF_VIEW_MM / 2
        clearance = np.min(np.hypot(*(contour - centre).T))
        if _inside(contour, centre) and clearance > radius + 0.03:
            return nodule
    raise RuntimeError("could not place a nodule inside the lungs")  # unreachable for sampled anatomy


# --------------------------------------------------------------------------- contour geometry
def _inside(polygon: np.ndarray, point: np.ndarray) -> bool:
    """Whether ``point`` lies inside ``polygon`` (even-odd ray casting)."""
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 <= point[1]) != (y1 <= point[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (point[1] - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (xs > point[0])) % 2)


def _catmull_rom(points: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Centripetal Catmull-Rom curve through ``points`` (K x 2), end tangents set by ``before``/``after``.

    Each span gets samples in proportion to its length; the last point is included.
    """
    p = np.vstack([before, points, after]).astype(np.float64)
    chord = np.linalg.norm(np.diff(p, axis=0), axis=1) ** 0.5 + 1e-9  # knot increments
    n_spans = len(points) - 1
    counts = np.maximum(3, np.ceil(chord[1:1 + n_spans] ** 2 * _DENSE)).astype(np.int64)
    span = np.repeat(np.arange(n_spans), counts)
    frac = np.concatenate([np.arange(c) / c for c in counts])[:, None]
    d0, d1, d2 = chord[span][:, None], chord[span + 1][:, None], chord[span + 2][:, None]
    p0, p1, p2, p3 = p[span], p[span + 1], p[span + 2], p[span + 3]
    t1, t2, t3 = d0, d0 + d1, d0 + d1 + d2
    t = t1 + frac * d1
    a1 = (t1 - t) / t1 * p0 + t / t1 * p1
    a2 = (t2 - t) / d1 * p1 + (t - t1) / d1 * p2
    a3 = (t3 - t) / d2 * p2 + (t - t2) / d2 * p3
    b1 = (t2 - t) / t2 * a1 + t / t2 * a2
    b2 = (t3 - t) / (d1 + d2) * a2 + (t - t1) / (d1 + d2) * a3
    curve = (t2 - t) / d1 * b1 + (t - t1) / d1 * b2
    return np.vstack([curve, points[-1:]])


def _closed_curve(controls: list[np.ndarray], smooth: list[bool]) -> list[np.ndarray]:
    """Dense pieces of a closed contour; piece ``k`` runs from ``controls[k][0]`` to ``controls[k+1][0]``.

    ``smooth[k]`` says whether the joint at the start of piece ``k`` is smooth (tangent shared
    with the previous piece) or a corner (each side uses its own one-sided tangent).
    """
    n = len(controls)
    pieces = []
    for k, ctrl in enumerate(controls):
        nxt = controls[(k + 1) % n]
        pts = np.vstack([ctrl, nxt[:1]])
        prev_ctrl = controls[k - 1]
        before = prev_ctrl[-1] if smooth[k] else 2 * pts[0] - pts[1]
        after = nxt[1] if smooth[(k + 1) % n] and len(nxt) > 1 else 2 * pts[-1] - pts[-2]
        pieces.append(_catmull_rom(pts, before, after))
    return pieces


def _diaphragm(cp: np.ndarray, cardiophrenic: np.ndarray, dome: float) -> list[np.ndarray]:
    """Two control points of a hemidiaphragm between the costophrenic and cardiophrenic angles.

    The dome bulges up by ``dome``; near the costophrenic angle the rise is kept below 50 degrees
    so the angle stays open (about 40-60 degrees, as on real films) even when the heart is wide.
    """
    points = []
    for s in (0.3, 0.65):
        x, y = cp + s * (cardiophrenic - cp)
        y -= dome * math.sin(math.pi * s) * 1.6
        y = max(y, cp[1] - math.tan(math.radians(50)) * abs(x - cp[0]))
        points.append(np.array([x, y]))
    return points


def _round_corner(controls: list[np.ndarray], piece: int, reach: float = 0.016,
                  pull: float = 0.5) -> list[np.ndarray]:
    """Round the corner at the start of ``piece`` into a tight smooth turn (use with a smooth joint).

    The corner point is replaced by a point ``pull`` of the way towards the chord between two
    points ``reach`` away along the arms, so the contour turns within a few pixels (a sharp
    costophrenic angle still looks sharp) and even an acute wedge stays wider than a pixel at its tip.
    """
    prev, cur = controls[piece - 1], controls[piece]
    tip = cur[0]

    def toward(p: np.ndarray) -> np.ndarray:
        return tip + reach * (p - tip) / np.linalg.norm(p - tip)

    a, b = toward(prev[-1]), toward(cur[1])
    out = list(controls)
    out[piece - 1] = np.vstack([prev, a])
    out[piece] = np.vstack([tip + pull * ((a + b) / 2 - tip), b, cur[1:]])
    return out


def _resample(polyline: np.ndarray, count: int) -> np.ndarray:
    """``count`` points evenly spaced by arc length along ``polyline``: first point in, last point out."""
    seg = np.hypot(*np.diff(polyline, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.arange(count) * s[-1] / count
    return np.stack([np.interp(targets, s, polyline[:, 0]), np.interp(targets, s, polyline[:, 1])], axis=1)


@dataclass
class _Outline:
    """A closed contour as consecutive dense pieces, with a landmark count per piece."""

    pieces: list[np.ndarray]
    counts: tuple[int, ...]

    def polygon(self) -> np.ndarray:
        return np.vstack([p[:-1] for p in self.pieces])

    def landmarks(self) -> np.ndarray:
        return np.vstack([_resample(p, c) for p, c in zip(self.pieces, self.counts, strict=True)])


def _band(centre: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Polygon of a band of ``width`` around a dense centre line (one edge, then the other edge back)."""
    tangent = np.gradient(centre, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    half = (width / 2)[:, None]
    return np.vstack([centre + normal * half, (centre - normal * half)[::-1]])


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


class _Anatomy:
    """All contours and auxiliary shapes of one phantom in the canonical frame."""

    def __init__(self, p: PhantomParams):
        self.p = p
        self.mid = 0.5
        self.w = p.thorax_half_width
        self.k = p.thorax_half_width / 0.37  # body scale for absolute offsets
        self.a = p.apex_y
        self.lung_len = p.lung_length * p.inspiration
        self.jitter = np.random.default_rng(p.anatomy_seed).normal(0.0, 1.0, size=64)
        self.outlines: dict[str, _Outline] = {}
        self._build_lungs_and_heart()
        self._build_clavicles()

    def y(self, f: float) -> float:
        return self.a + f * self.lung_len

    def _build_lungs_and_heart(self) -> None:
        p, w, j = self.p, self.w, self.jitter
        lateral = {}
        for side, (apex_d, cp_f), off in ((-1, (0.36, 0.985), 0), (1, (0.38, 1.0), 8)):
            ds = np.array([apex_d, 0.62, 0.82, 0.92, 0.975, 1.0, 0.97]) + 0.012 * j[off:off + 7]
            fs = np.array([0.0, 0.06, 0.20, 0.42, 0.66, 0.86, cp_f])
            lateral[side] = np.stack([self.mid + side * ds * w, self.a + fs * self.lung_len], axis=1)
        thorax_width = lateral[1][:, 0].max() - lateral[-1][:, 0].min()
        hw = p.ctr * thorax_width
        x_r = self.mid - p.heart_right_share * hw
        y_top, y_bot = self.y(p.heart_top_f), self.y(p.heart_bottom_f)

        def h(hx: float, hy: float) -> np.ndarray:
            return np.array([x_r + hx * hw, y_top + hy * (y_bot - y_top)])

        heart_right = [h(0.04, 0.80), h(0.0, 0.62), h(0.02, 0.40), h(0.08, 0.15)]
        heart_top = [h(0.18, 0.05), h(0.40, 0.0)]
        heart_left = [h(0.62, 0.03), h(0.80, 0.22), h(0.95, 0.48), h(1.0, 0.72)]
        heart_bottom = [h(0.96, 0.93), h(0.80, 1.0), h(0.50, 1.0), h(0.25, 0.95)]
        heart_ctrl = [np.array(c) for c in (heart_right, heart_top, heart_left, heart_bottom)]
        self.outlines["heart"] = _Outline(_closed_curve(heart_ctrl, [False, False, False, False]),
                                          PIECE_COUNTS["heart"])

        gap = np.array([0.004, 0.0])
        k = self.k
        # right lung (image left): lateral | diaphragm | medial, apex joint smooth
        cp, rcp = lateral[-1][-1], h(0.04, 0.80) - gap
        dome = _diaphragm(cp, rcp, p.right_dome)
        medial = [rcp, h(0.0, 0.62) - gap, h(0.02, 0.40) - gap, h(0.08, 0.15) - gap,
                  np.array([self.mid - 0.055 * k, y_top - 0.03]),
                  np.array([self.mid - 0.045 * k, self.y(0.25)]),
                  np.array([self.mid - 0.05 * k, self.y(0.10)])]
        ctrl = [lateral[-1][:-1], np.vstack([cp, *dome]), np.vstack(medial)]
        ctrl = _round_corner(_round_corner(ctrl, 1), 2)
        self.outlines["right_lung"] = _Outline(_closed_curve(ctrl, [True] * 3), PIECE_COUNTS["right_lung"])
        self.right_diaphragm = self.outlines["right_lung"].pieces[1]

        # left lung (image right): lateral | diaphragm | medial along the heart, aortic knob, mediastinum
        cp, lcp = lateral[1][-1], h(0.96, 0.93) + gap
        dome = _diaphragm(cp, lcp, p.left_dome)
        knob_y = self.y(p.heart_top_f - 0.19)
        self.knob = (self.mid + (0.10 + p.aortic_knob) * k, knob_y)
        medial = [lcp, h(1.0, 0.72) + gap, h(0.95, 0.48) + gap, h(0.80, 0.22) + gap, h(0.62, 0.03) + gap,
                  np.array([self.mid + 0.085 * k, self.y(p.heart_top_f - 0.10)]), np.array(self.knob),
                  np.array([self.mid + 0.06 * k, self.y(p.heart_top_f - 0.27)]),
                  np.array([self.mid + 0.05 * k, self.y(0.12)])]
        ctrl = [lateral[1][:-1], np.vstack([cp, *dome]), np.vstack(medial)]
        ctrl = _round_corner(_round_corner(ctrl, 1), 2)
        self.outlines["left_lung"] = _Outline(_closed_curve(ctrl, [True] * 3), PIECE_COUNTS["left_lung"])
        self.left_diaphragm = self.outlines["left_lung"].pieces[1]
        self.heart_bottom = self.outlines["heart"].pieces[3]

    def _build_clavicles(self) -> None:
        p, w, k, j = self.p, self.w, self.k, self.jitter
        for side, name, off in ((-1, "right_clavicle", 20), (1, "left_clavicle", 30)):
            base = self.a + p.shoulder_drop
            ds = [0.70 * w, 0.50 * w, 0.30 * w, 0.07 * k]
            ys = [base + 0.035, base + 0.040, base + 0.055 + 0.5 * p.clavicle_tilt,
                  base + 0.10 + p.clavicle_tilt]
            ctrl = np.array([[self.mid + side * d, yy + 0.004 * j[off + i]]
                             for i, (d, yy) in enumerate(zip(ds, ys, strict=True))])
            centre = _catmull_rom(ctrl, 2 * ctrl[0] - ctrl[1], 2 * ctrl[-1] - ctrl[-2])
            s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(centre, axis=0).T))])
            width = np.interp(s / s[-1], [0.0, 0.5, 0.85, 1.0], [0.026, 0.021, 0.027, 0.034]) * k
            tangent = np.gradient(centre, axis=0)
            tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
            up = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
            if up[len(up) // 2, 1] > 0:
                up = -up
            upper = centre + up * width[:, None] / 2
            lower = centre - up * width[:, None] / 2
            pieces = [upper, _cap(centre[-1], upper[-1], lower[-1], centre[-1] - centre[-2]), lower[::-1],
                      _cap(centre[0], lower[0], upper[0], centre[0] - centre[1])]
            self.outlines[name] = _Outline(pieces, PIECE_COUNTS[name])

    # ---- auxiliary shapes (canonical frame), used only for the image
    def body(self) -> np.ndarray:
        p, w, a = self.p, self.w, self.a
        wb = w + p.body_fat
        half = np.array([
            [p.neck_half_width, -0.3], [p.neck_half_width, a - 0.04], [p.neck_half_width + 0.05, a - 0.005],
            [0.75 * w, a - 0.02 + p.shoulder_drop], [w + 0.09, a + 0.005 + p.shoulder_drop],
            [wb + 0.07, a + 0.06 + p.shoulder_drop], [wb + 0.025, self.y(0.25)], [wb, self.y(0.55)],
            [wb + 0.012, self.y(0.95)], [wb + 0.035, 1.4],
        ])
        curve = _catmull_rom(half, 2 * half[0] - half[1], 2 * half[-1] - half[-2])
        right = np.stack([self.mid - curve[:, 0], curve[:, 1]], axis=1)
        left = np.stack([self.mid + curve[::-1, 0], curve[::-1, 1]], axis=1)
        return np.vstack([right, left])

    def arms(self) -> list[np.ndarray]:
        p, w, a = self.p, self.w, self.a
        wb = w + p.body_fat
        out = []
        for side in (-1, 1):
            inner = wb + 0.055
            poly = np.array([[inner, a + 0.12], [inner + 0.03, a + 0.03], [inner + 0.14, a + 0.02],
                             [inner + 0.16, 1.4], [inner + 0.01, 1.4], [inner - 0.01, self.y(0.5)]])
            out.append(np.stack([self.mid + side * poly[:, 0], poly[:, 1] + p.shoulder_drop], axis=1))
        return out

    def abdomen(self) -> np.ndarray:
        right = self.right_diaphragm
        left = self.left_diaphragm[::-1]
        bottom = self.heart_bottom[::-1]
        return np.vstack([[-0.6, right[0, 1] + 0.02], right, bottom, left, [1.6, left[-1, 1] + 0.02],
                          [1.6, 1.6], [-0.6, 1.6]])

    def ribs(self) -> tuple[list[tuple[np.ndarray, float]], list[tuple[np.ndarray, float]]]:
        """Posterior rib arcs and fainter anterior ribs as (dense centre line, width)."""
        w, k, j = self.w, self.k, self.jitter
        spacing = self.p.rib_spacing * (1 + 0.5 * (self.p.inspiration - 1))
        posterior, anterior = [], []
        for side in (-1, 1):
            for i in range(12):
                y0 = self.a - 0.03 + i * spacing + 0.002 * j[40 + i]
                reach = min(1.0, 0.55 + 0.16 * i)
                drop = min(1.0, 0.5 + 0.12 * i)
                ds = np.array([0.04 * k / w, *(np.array([0.3, 0.6, 0.86, 1.0, 1.06]) * reach)])
                dy = np.array([0.0, -0.012, 0.0, 0.035, 0.085, 0.15]) * drop
                ctrl = np.stack([self.mid + side * ds * w, y0 + dy], axis=1)
                centre = _catmull_rom(ctrl, 2 * ctrl[0] - ctrl[1], 2 * ctrl[-1] - ctrl[-2])
                posterior.append((centre, (0.018 + 0.0009 * i) * k))
                if 1 <= i <= 7:
                    ya = y0 + 0.1 * drop
                    ctrl = np.stack([self.mid + side * np.array([1.0, 0.75, 0.45, 0.25]) * w,
                                     ya + np.array([0.0, 0.05, 0.11, 0.14])], axis=1)
                    centre = _catmull_rom(ctrl, 2 * ctrl[0] - ctrl[1], 2 * ctrl[-1] - ctrl[-2])
                    anterior.append((centre, 0.016 * k))
        return posterior, anterior

    def vertebrae(self) -> list[np.ndarray]:
        k, spacing = self.k, self.p.rib_spacing * (1 + 0.5 * (self.p.inspiration - 1))
        shapes = []
        y = self.a - 0.07 - 2 * spacing
        while y < 1.3:
            hw = (0.032 + 0.01 * max(0.0, y - self.a)) * k
            top, bot = y + 0.1 * spacing, y + 0.88 * spacing
            shapes.append(np.array([[self.mid - hw, top], [self.mid + hw, top], [self.mid + hw * 1.05, bot],
                                    [self.mid - hw * 1.05, bot]]))
            for side in (-1, 1):
                pedicle = _ellipse(self.mid + side * 0.75 * hw, y + 0.35 * spacing, 0.008 * k, 0.013 * k, 16)
                shapes.append(pedicle)
            y += spacing
        return shapes

    def trachea(self) -> np.ndarray:
        k = self.k
        carina = self.y(self.p.heart_top_f - 0.2)
        half = np.array([[0.018, -0.3], [0.018, carina - 0.04], [0.06, carina + 0.05], [0.045, carina + 0.06],
                         [0.0, carina + 0.005]]) * np.array([k, 1.0])
        return np.vstack([np.stack([self.mid + 0.004 - half[:, 0], half[:, 1]], axis=1),
                          np.stack([self.mid + 0.004 + half[::-1, 0], half[::-1, 1]], axis=1)])

    def nodule_centre(self, nodule: Nodule) -> np.ndarray:
        side = -1 if nodule.side == "right" else 1
        return np.array([self.mid + side * nodule.lateral * self.w, self.y(nodule.height)])

    def lung_base(self, side: str) -> tuple[float, float]:
        """x of the costophrenic and of the cardiophrenic angle of one lung."""
        piece = self.right_diaphragm if side == "right" else self.left_diaphragm
        return float(piece[0, 0]), float(piece[-1, 0])

    def ctr(self) -> float:
        heart = self.outlines["heart"].polygon()[:, 0]
        left, right = self.outlines["left_lung"].polygon(), self.outlines["right_lung"].polygon()
        thorax = left[:, 0].max() - right[:, 0].min()
        return float((heart.max() - heart.min()) / thorax)


def _cap(centre: np.ndarray, start: np.ndarray, end: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Half circle around ``centre`` from ``start`` to ``end``, bulging towards ``outward``."""
    r = np.linalg.norm(start - centre)
    a0 = math.atan2(*(start - centre)[::-1])
    a1 = math.atan2(*(end - centre)[::-1])
    sweep = (a1 - a0) % (2 * math.pi)
    test = a0 + sweep / 2
    if np.dot([math.cos(test), math.sin(test)], outward) < 0:  # that way round bulges into the band
        sweep -= 2 * math.pi
    t = a0 + np.linspace(0.0, 1.0, max(8, int(math.pi * r * _DENSE))) * sweep
    return np.stack([centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)], axis=1)


# --------------------------------------------------------------------------- rasterising
def _fill_box(rings: list[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """Union of the insides of ``rings`` over their bounding box of pixel centres: (mask, row0, col0).

    Scanline fill with the nonzero winding rule, each ring oriented the same way first, so
    overlapping rings add up to their union; for one simple polygon it is the plain inside.
    """
    h, w = shape
    starts, ends = [], []
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64)
        x, y = ring[:, 0], ring[:, 1]
        if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) < 0:
            ring = ring[::-1]
        starts.append(ring)
        ends.append(np.roll(ring, -1, axis=0))
    a, b = np.vstack(starts), np.vstack(ends)
    r0, r1 = max(0, int(math.ceil(a[:, 1].min()))), min(h - 1, int(math.floor(a[:, 1].max())))
    c0, c1 = max(0, int(math.ceil(a[:, 0].min()))), min(w - 1, int(math.floor(a[:, 0].max())))
    if r1 < r0 or c1 < c0:
        return None
    x0, y0, x1, y1 = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    # an edge crosses the scanlines r with min(y0, y1) <= r < max(y0, y1) (each crossing counted once)
    first = np.clip(np.ceil(np.minimum(y0, y1)), r0, r1 + 1).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(y0, y1)), r0, r1 + 1).astype(np.int64)
    n = stop - first
    e = np.repeat(np.arange(len(n)), n)
    row = first[e] + (np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n))
    xs = x0[e] + (row - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
    cols = np.clip(np.ceil(xs) - c0, 0, c1 - c0 + 1).astype(np.int64)
    winding = np.zeros((r1 - r0 + 1, c1 - c0 + 2), dtype=np.int32)
    np.add.at(winding, (row - r0, cols), np.where(y1[e] > y0[e], 1, -1).astype(np.int32))
    return np.cumsum(winding, axis=1)[:, :-1] != 0, r0, c0


def fill_polygon(polygon: np.ndarray | list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the pixel centres inside ``polygon`` ((x, y) pixel coordinates) or a list of rings."""
    mask = np.zeros(shape, dtype=bool)
    rings = polygon if isinstance(polygon, list) else [polygon]
    box = _fill_box(rings, shape)
    if box is not None:
        sub, r0, c0 = box
        mask[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]] = sub
    return mask


class _Frame:
    """Similarity transform from the canonical frame (units of the image side) to pixel coordinates."""

    def __init__(self, p: PhantomParams, size: int):
        t = math.radians(p.rotation_deg)
        self.m = p.zoom * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        self.shift = np.array(p.shift)
        self.size = size

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        q = (np.asarray(pts) - 0.5) @ self.m.T + 0.5 + self.shift
        return q * self.size - 0.5

    def canonical_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (x, y) of every pixel centre."""
        c = (np.arange(self.size) + 0.5) / self.size
        qx, qy = np.meshgrid(c - 0.5 - self.shift[0], c - 0.5 - self.shift[1])
        inv = np.linalg.inv(self.m)
        return inv[0, 0] * qx + inv[0, 1] * qy + 0.5, inv[1, 0] * qx + inv[1, 1] * qy + 0.5


class _Canvas:
    """Density layers painted from canonical polygons; each layer is blurred once at the end."""

    def __init__(self, frame: _Frame):
        self.frame = frame
        self.shape = (frame.size, frame.size)
        self.layers: dict[float, np.ndarray] = {}

    def mask(self, polygon: np.ndarray) -> np.ndarray:
        return fill_polygon(self.frame(polygon), self.shape)

    def paint(self, shapes: np.ndarray | list[np.ndarray], value: float, sigma: float) -> None:
        """Add ``value`` inside the union of ``shapes`` to the layer that is blurred with ``sigma``."""
        rings = shapes if isinstance(shapes, list) else [shapes]
        box = _fill_box([self.frame(r) for r in rings], self.shape)
        if box is None:
            return
        sub, r0, c0 = box
        view = self.layer(sigma)[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]]
        view += sub * np.float32(value)

    def layer(self, sigma: float) -> np.ndarray:
        if sigma not in self.layers:
            self.layers[sigma] = np.zeros(self.shape, np.float32)
        return self.layers[sigma]

    def blurred(self, px: float) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        for sigma, layer in self.layers.items():
            out += ndimage.gaussian_filter(layer, sigma * px, mode="nearest")
        return out


def _distance_profile(mask: np.ndarray, scale_px: float, factor: int = 1) -> np.ndarray:
    """sqrt(distance to the mask's border / scale), clipped to [0, 1]; optionally on a coarser grid."""
    if factor > 1:
        small = mask[factor // 2::factor, factor // 2::factor]
        dist = ndimage.distance_transform_edt(small) * factor
        dist = ndimage.zoom(dist, factor, order=1, grid_mode=True, mode="nearest")
        dist = dist[:mask.shape[0], :mask.shape[1]]
    else:
        dist = ndimage.distance_transform_edt(mask)
    return np.sqrt(np.clip(dist / scale_px, 0.0, 1.0)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _vessel_tree(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A branching vessel tree from a hilum at the origin, growing laterally (+x): starts, ends, widths."""
    rng = np.random.default_rng(seed)
    starts, ends, widths = [], [], []
    for base in (-70, -35, 0, 35, 70):
        stack = [(np.zeros(2), math.radians(base + rng.uniform(-10, 10)), 0.10, 0.009, 0)]
        while stack:
            start, ang, length, width, depth = stack.pop()
            end = start + length * np.array([math.cos(ang), math.sin(ang)])
            starts.append(start)
            ends.append(end)
            widths.append(width)
            if depth < 4:
                for turn in (-1, 1):
                    stack.append((end, ang + turn * math.radians(rng.uniform(15, 35)),
                                  length * rng.uniform(0.6, 0.8), width * 0.7, depth + 1))
    return np.array(starts), np.array(ends), np.array(widths)


def render_phantom(rng: np.random.Generator, size: int, params: PhantomParams | None = None) -> Phantom:
    """Render one phantom of ``size`` x ``size`` pixels.

    ``params`` fixes the anatomy and the acquisition; without it a random patient and acquisition
    are drawn from ``rng``. ``rng`` also draws the noise and texture of this acquisition.
    """
    if size < 32:
        raise SynthError(f"image size must be at least 32 pixels, got {size}")
    if params is None:
        params = vary_acquisition(rng, sample_patient(rng))
    anatomy = _Anatomy(params)
    frame = _Frame(params, size)
    canvas = _Canvas(frame)
    shape = canvas.shape
    px = size / 256.0  # pixel scale relative to a 256-pixel image
    k = anatomy.k

    contours = {s: frame(anatomy.outlines[s].polygon()) for s in STRUCTURES}
    masks = {s: fill_polygon(contours[s], shape) for s in STRUCTURES}
    landmarks = {s: frame(anatomy.outlines[s].landmarks()) for s in STRUCTURES}

    # soft tissue: thickness grows with the distance from the skin
    body = canvas.mask(anatomy.body())
    if params.arms:
        for arm in anatomy.arms():
            body |= canvas.mask(arm)
    canvas.layer(1.0)[:] = 0.6 * _distance_profile(body, 0.16 * size, factor=2) + 0.2 * body
    canvas.paint(anatomy.abdomen(), 0.1, 2.0)
    canvas.layer(2.0)[:] *= body
    if params.breasts:
        canvas.paint([_ellipse(anatomy.mid + side * 0.6 * anatomy.w, anatomy.y(0.78), 0.17 * k, 0.12 * k)
                      for side in (-1, 1)], 0.06, 4.0)

    # air in the lungs (deeper lung holds more air), with a faint parenchymal texture
    lungs = masks["right_lung"] | masks["left_lung"]
    organs = _distance_profile(lungs | masks["heart"], 0.07 * size)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.5 * px)
    texture *= 0.06 / (texture.std() + 1e-6)
    canvas.layer(0.8)[:] = -0.55 * lungs * (0.45 + 0.55 * organs) * (1.0 + texture)
    canvas.layer(1.0)[:] += 0.08 * masks["heart"] * organs
    canvas.paint(_ellipse(*anatomy.knob, 0.03 * k, 0.028 * k), 0.06, 1.0)
    canvas.paint(anatomy.trachea(), -0.12, 1.0)
    if params.gastric_bubble:
        x_cp, x_card = anatomy.lung_base("left")
        xb = 0.5 * (x_cp + x_card)
        yb = float(np.interp(xb, anatomy.left_diaphragm[::-1, 0], anatomy.left_diaphragm[::-1, 1])) + 0.04
        canvas.paint(_ellipse(xb, yb, 0.045 * k, 0.022 * k), -0.12, 2.0)
    _paint_bones(anatomy, canvas)

    findings = _findings(anatomy, frame, size)
    if params.nodule is not None:
        centre = anatomy.nodule_centre(params.nodule)
        radius = params.nodule.diameter_mm / FIELD_OF_VIEW_MM / 2
        for frac in (1.0, 0.85, 0.65, 0.4):  # stacked discs approximate a sphere's thickness profile
            canvas.paint(_ellipse(*centre, radius * frac, radius * frac), 0.055, 0.6)
    density = canvas.blurred(px)
    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float32), 0.8 * px)
    density += 0.1 * _vessels(anatomy, frame, px) * lung_soft
    if params.effusion_side is not None:
        density += 0.5 * _effusion(anatomy, frame, masks, px)

    image = _expose(density, params, rng, px)
    return Phantom(image=image, masks=masks, landmarks=landmarks, findings=findings, params=params,
                   contours=contours)


def _paint_bones(anatomy: _Anatomy, canvas: _Canvas) -> None:
    """Ribs (cortical rim brighter than the marrow), clavicles, spine, humeral heads."""
    posterior, anterior = anatomy.ribs()
    canvas.paint([_band(c, np.full(len(c), w)) for c, w in posterior], 0.08, 0.7)
    canvas.paint([_band(c, np.full(len(c), 0.45 * w)) for c, w in posterior], -0.032, 0.7)
    canvas.paint([_band(c, np.full(len(c), w)) for c, w in anterior], 0.03, 1.0)
    canvas.paint([anatomy.outlines[s].polygon() for s in ("right_clavicle", "left_clavicle")], 0.1, 0.7)
    canvas.paint(anatomy.vertebrae(), 0.06, 1.0)
    p = anatomy.p
    wb = anatomy.w + p.body_fat
    heads = [_ellipse(anatomy.mid + side * (wb + 0.085), anatomy.a + 0.06 + p.shoulder_drop, 0.055, 0.06)
             for side in (-1, 1)]
    canvas.paint(heads, 0.1, 1.0)


def _vessels(anatomy: _Anatomy, frame: _Frame, px: float) -> np.ndarray:
    """Pulmonary vessels branching from both hila (drawn everywhere; the caller keeps the lung part)."""
    img = Image.new("F", (frame.size, frame.size), 0.0)
    draw = ImageDraw.Draw(img)
    starts, ends, widths = _vessel_tree(anatomy.p.anatomy_seed)
    scale = np.array([anatomy.k, anatomy.k])
    for side, hilum_f in ((-1, anatomy.p.heart_top_f - 0.06), (1, anatomy.p.heart_top_f - 0.1)):
        hilum = np.array([anatomy.mid + side * 0.12 * anatomy.k, anatomy.y(hilum_f)])
        flip = np.array([side, 1.0])
        a = frame(hilum + starts * scale * flip)
        b = frame(hilum + ends * scale * flip)
        w = np.maximum(1, np.round(widths * anatomy.k * frame.size * anatomy.p.zoom)).astype(int)
        for (x0, y0), (x1, y1), wi in zip(a.tolist(), b.tolist(), w.tolist(), strict=True):
            draw.line([(x0, y0), (x1, y1)], fill=1.0, width=wi)
    return ndimage.gaussian_filter(np.asarray(img, dtype=np.float32), 0.6 * px)


def _effusion(anatomy: _Anatomy, frame: _Frame, masks: dict[str, np.ndarray], px: float) -> np.ndarray:
    """Fluid in one costophrenic recess: a meniscus, higher laterally, that replaces the air."""
    side = anatomy.p.effusion_side
    x_cp, x_card = anatomy.lung_base(side)
    diaphragm = anatomy.right_diaphragm if side == "right" else anatomy.left_diaphragm
    order = np.argsort(diaphragm[:, 0])
    gx, gy = frame.canonical_grid()
    floor = np.interp(gx, diaphragm[order, 0], diaphragm[order, 1])
    lateral = np.clip((gx - x_card) / (x_cp - x_card), 0.0, 1.0)
    surface = floor - anatomy.p.effusion_height * (0.15 + 0.85 * lateral**1.5)
    fluid = 1.0 / (1.0 + np.exp(-(gy - surface) / 0.006))
    lung = ndimage.gaussian_filter(masks[f"{side}_lung"].astype(np.float32), px)
    return lung * fluid.astype(np.float32)


def pixel_spacing_mm(params: PhantomParams, size: int) -> float:
    """Pixel spacing of an image: the field of view over the side, smaller when the zoom magnifies."""
    return FIELD_OF_VIEW_MM / (size * params.zoom)


def _findings(anatomy: _Anatomy, frame: _Frame, size: int) -> dict[str, object]:
    p = anatomy.p
    ctr = anatomy.ctr()
    spacing = pixel_spacing_mm(p, size)
    out: dict[str, object] = {
        "ctr": round(ctr, 4), "cardiomegaly": int(ctr > CARDIOMEGALY_CTR),
        "nodule": 0, "nodule_x": float("nan"), "nodule_y": float("nan"), "nodule_size": float("nan"),
        "nodule_size_mm": float("nan"), "nodule_side": "",
        "effusion": int(p.effusion_side is not None), "effusion_side": p.effusion_side or "",
    }
    if p.nodule is not None:
        x, y = frame(anatomy.nodule_centre(p.nodule)[None])[0]
        out.update(nodule=1, nodule_x=float(x), nodule_y=float(y), nodule_size=p.nodule.diameter_mm / spacing,
                   nodule_size_mm=p.nodule.diameter_mm, nodule_side=p.nodule.side)
    return out


def _expose(density: np.ndarray, p: PhantomParams, rng: np.random.Generator, px: float) -> np.ndarray:
    """Density -> displayed image: a film-like shoulder that compresses dense regions, contrast, gamma,
    detector blur, quantum noise (stronger where dense)."""
    img = 0.9 * (1.0 - np.exp(-2.2 * np.clip(density, 0.0, None))) / (1.0 - math.exp(-2.2))
    img = np.clip(img, 0.0, 1.0) ** p.gamma
    img = p.contrast * (img - 0.5) + 0.5 + p.exposure
    img = ndimage.gaussian_filter(np.clip(img, 0.0, 1.0), p.blur_px * px)
    grain = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 0.5 * px)
    grain /= grain.std() + 1e-6
    img = img + p.noise * (0.4 + 0.6 * img) * grain
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- data set
@dataclass(frozen=True)
class _Job:
    out: str
    seed: int
    index: int
    patient: int
    acquisition: int
    image_id: str
    patient_id: str
    split: str
    size: int
    findings_rate: float
    formats: tuple[str, ...]


def dicom_relpath(image_id: str, split: str) -> str:
    """Where an image's DICOM lives, relative to the phantom folder: ``dicom/<split>/<id>.dcm``."""
    return f"dicom/{split}/{image_id}.dcm"


def _patient_params(seed: int, patient: int, findings_rate: float) -> PhantomParams:
    return sample_patient(np.random.default_rng([seed, patient, 0]), findings_rate=findings_rate)


def _make_image(job: _Job) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Render and write one image with its masks and landmarks; return its table row and landmarks."""
    from holons.data.synthetic.dicom_writer import radiograph_dicom_bytes

    out = Path(job.out)
    patient = _patient_params(job.seed, job.patient, job.findings_rate)
    rng = np.random.default_rng([job.seed, job.patient, job.acquisition + 1])
    params = vary_acquisition(rng, patient)
    if job.acquisition == 0:
        params = replace(params, inspiration=1.0)
    phantom = render_phantom(rng, job.size, params)
    modality = ("CR", "DX")[(job.index + job.seed) % 2]
    photometric = "MONOCHROME1" if (job.index + job.seed) % 3 == 0 else "MONOCHROME2"
    spacing = pixel_spacing_mm(params, job.size)

    for s in STRUCTURES:
        _write_png(out / "masks" / s / f"{job.image_id}.png", phantom.masks[s].astype(np.uint8) * 255)
        buf = io.BytesIO()
        np.save(buf, phantom.landmarks[s])
        _write_file(out / "landmarks" / LANDMARK_KEYS[s] / f"{job.image_id}.npy", buf.getvalue())
    image_path = dicom_path = ""
    if "png" in job.formats:
        image_path = f"images/{job.image_id}.png"
        _write_png(out / image_path, np.round(phantom.image * 255).astype(np.uint8))
    if "dicom" in job.formats:
        dicom_path = dicom_relpath(job.image_id, job.split)
        data = radiograph_dicom_bytes(
            phantom.image, patient_id=job.patient_id, sex=patient.sex,
            modality=modality, photometric=photometric, pixel_spacing_mm=spacing,
            uid_entropy=("holons-phantom", str(job.seed), job.patient_id, str(job.acquisition)),
            acquisition=job.acquisition, rng=rng,
        )
        _write_file(out / dicom_path, data)
    row = {
        "id": job.image_id, "patient_id": job.patient_id, "split": job.split, "acquisition": job.acquisition,
        "sex": patient.sex, "modality": modality if dicom_path else "",
        "photometric": photometric if dicom_path else "",
        "size": job.size, "pixel_spacing_mm": round(spacing, 6), **phantom.findings,
        "rotation_deg": round(params.rotation_deg, 3), "inspiration": round(params.inspiration, 4),
        "image_path": image_path, "dicom_path": dicom_path,
    }
    return row, phantom.landmarks


def _write_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    _write_file(path, buf.getvalue())


def _write_file(path: Path, data: bytes) -> None:
    """Write through a temporary sibling and rename, so no half-written file ever has the final name.

    Unlike ``atomic_write`` this skips fsync: a dozen small files per image would spend most of
    the run in fsync, and an interrupted set is recognisable anyway because ``image_table.csv``
    (fsynced) is written last.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_radiographs(
    out: str | os.PathLike,
    *,
    n: int,
    seed: int = 0,
    size: int = 256,
    images_per_patient: int = 3,
    findings_rate: float = 0.3,
    formats: tuple[str, ...] | list[str] = ("dicom", "png"),
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``n`` phantom radiographs with masks, landmarks and an image table; return the table path.

    Images come in groups of ``images_per_patient`` acquisitions of one synthetic patient, and
    the train/val/test split is by patient. The same ``seed`` gives identical files (DICOM: the
    same pixels and UIDs) whatever ``workers`` is. ``formats`` picks "png" and/or "dicom" images
    (DICOMs go to ``dicom/<split>/``, so ``holons index out/dicom/train`` gives a pretraining
    archive without the evaluation images); masks and landmarks are always written;
    ``image_table.csv`` is written last, so a set without it is incomplete. A folder holding an
    earlier phantom set is updated in place (files the new set does not own are removed); folders
    holding anything else are refused.
    """
    formats = tuple(formats)
    _check_args(n, size, images_per_patient, findings_rate, formats)
    out = Path(out)
    old_ids = _previous_ids(out)
    n_patients = math.ceil(n / images_per_patient)
    splits = index_split(  # by patient; each split non-empty from 3 patients on
        n_patients, test_fraction=SPLIT_FRACTIONS["test"], val_fraction=SPLIT_FRACTIONS["val"], seed=seed
    ).tolist()
    jobs = []
    for i in range(n):
        patient, acq = divmod(i, images_per_patient)
        patient_id = f"PHANTOM-{patient:04d}"
        jobs.append(_Job(str(out.absolute()), seed, i, patient, acq, f"phantom_{patient:04d}_{acq:02d}",
                         patient_id, splits[patient], size, findings_rate, formats))
    if workers is None:
        workers = 1 if n < 24 else min(8, _cpu_count())
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    (out / "image_table.csv").unlink(missing_ok=True)  # no table until the new set is complete
    bar = tqdm(total=n, desc="phantoms", unit="img", disable=not progress)
    results: list[tuple[dict, dict] | None] = [None] * n
    if workers > 1 and n > 1:
        context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
        pool = cf.ProcessPoolExecutor(max_workers=min(workers, n), mp_context=context)
        try:
            futures = {pool.submit(_make_image, job): job.index for job in jobs}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for job in jobs:
            results[job.index] = _make_image(job)
            bar.update()
    bar.close()

    new_dicoms = {str(row["dicom_path"]) for row, _ in results if row["dicom_path"]}
    _remove_stale(out, old_ids, {job.image_id for job in jobs}, new_dicoms, formats)
    _write_landmarks_csv(out / "landmarks_long.csv", [(r[0]["id"], r[1]) for r in results])
    table = out / "image_table.csv"
    with atomic_write(table, "w") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row, _ in results:
            writer.writerow({k: _fmt(row[k]) for k in TABLE_COLUMNS})
    return table


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_args(n: int, size: int, images_per_patient: int, findings_rate: float, formats: tuple) -> None:
    if n < 1:
        raise SynthError(f"--n must be at least 1, got {n}")
    if not 32 <= size <= 4096:
        raise SynthError(f"--size must be between 32 and 4096 pixels, got {size}")
    if images_per_patient < 1:
        raise SynthError(f"images_per_patient must be at least 1, got {images_per_patient}")
    if not 0.0 <= findings_rate <= 1.0:
        raise SynthError(f"findings_rate must be within [0, 1], got {findings_rate}")
    unknown = set(formats) - {"png", "dicom"}
    if unknown or not formats:
        raise SynthError(f"formats must be a non-empty subset of ('png', 'dicom'), got {formats}")


_LAYOUT = {"images", "dicom", "masks", "landmarks", "landmarks_long.csv", "image_table.csv"}


def _previous_ids(out: Path) -> set[str]:
    """Image ids of an earlier (possibly interrupted) phantom set in ``out``.

    A folder holding anything but the phantom layout is refused, so nothing of the user's is
    overwritten or deleted.
    """
    if out.exists() and not out.is_dir():
        raise SynthError(f"output path exists and is not a folder: {out}")
    if not out.exists():
        return set()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _LAYOUT)
    if foreign:
        raise SynthError(f"refusing to write phantoms into a non-empty folder with other files "
                         f"({', '.join(foreign[:3])}): {out}")
    ids = set()
    for sub in ("images", "masks/*", "landmarks/*"):
        for folder in out.glob(sub):
            if folder.is_dir():
                ids.update(p.stem for p in folder.iterdir() if p.suffix in (".png", ".npy"))
    ids.update(p.stem for p in _previous_dicoms(out))
    return ids


def _previous_dicoms(out: Path) -> list[Path]:
    """DICOMs of an earlier set: ``dicom/<split>/*.dcm``, and ``dicom/*.dcm`` of the older flat layout."""
    return [p for pattern in ("dicom/*.dcm", *(f"dicom/{s}/*.dcm" for s in SPLIT_FRACTIONS))
            for p in out.glob(pattern) if p.is_file()]


def _remove_stale(out: Path, old_ids: set[str], new_ids: set[str], new_dicoms: set[str],
                  formats: tuple[str, ...]) -> None:
    """Delete the files of an earlier set that the new set does not own (other ids, dropped formats).

    A DICOM is stale unless it sits at a path of ``new_dicoms``: an image whose patient moved to
    another split leaves no copy in its old split's folder for ``holons index`` to find.
    """
    for path in _previous_dicoms(out):
        if path.relative_to(out).as_posix() not in new_dicoms:
            path.unlink(missing_ok=True)
    for split in SPLIT_FRACTIONS:
        folder = out / "dicom" / split
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for image_id in old_ids:
        gone = image_id not in new_ids
        paths = []
        if gone or "png" not in formats:
            paths.append(out / "images" / f"{image_id}.png")
        if gone:
            paths += [out / "masks" / s / f"{image_id}.png" for s in STRUCTURES]
            paths += [out / "landmarks" / LANDMARK_KEYS[s] / f"{image_id}.npy" for s in STRUCTURES]
        for path in paths:
            path.unlink(missing_ok=True)


def _write_landmarks_csv(path: Path, items: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    with atomic_write(path, "w") as f:
        f.write("image,structure,point_index,x,y\n")
        for image_id, landmarks in items:
            for s in STRUCTURES:
                key = LANDMARK_KEYS[s]
                for k, (x, y) in enumerate(landmarks[s]):
                    f.write(f"{image_id},{key},{k},{x:.4f},{y:.4f}\n")


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}".rstrip("0").rstrip(".")
    return value
