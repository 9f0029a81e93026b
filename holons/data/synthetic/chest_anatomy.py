"""Anatomy of a synthetic PA chest phantom: patients drawn at random and their contours.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from holons.data.synthetic.chest_params import FIELD_OF_VIEW_MM, PIECE_COUNTS, Nodule, PhantomParams

_DENSE = 600.0  # contour samples per unit length (canonical frame)


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
    anatomy = Anatomy(params)
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


def band(centre: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Polygon of a band of ``width`` around a dense centre line (one edge, then the other edge back)."""
    tangent = np.gradient(centre, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    half = (width / 2)[:, None]
    return np.vstack([centre + normal * half, (centre - normal * half)[::-1]])


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


class Anatomy:
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
                pedicle = ellipse(self.mid + side * 0.75 * hw, y + 0.35 * spacing, 0.008 * k, 0.013 * k, 16)
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

