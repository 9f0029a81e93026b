"""Rendering of a synthetic chest phantom: contours rasterised to masks, densities painted and
exposed to an image (``render_phantom``)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from holons.data.synthetic.chest_anatomy import Anatomy, band, ellipse, sample_patient, vary_acquisition
from holons.data.synthetic.chest_params import (
    CARDIOMEGALY_CTR,
    FIELD_OF_VIEW_MM,
    STRUCTURES,
    PhantomParams,
    SynthError,
)


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
    anatomy = Anatomy(params)
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
        canvas.paint([ellipse(anatomy.mid + side * 0.6 * anatomy.w, anatomy.y(0.78), 0.17 * k, 0.12 * k)
                      for side in (-1, 1)], 0.06, 4.0)

    # air in the lungs (deeper lung holds more air), with a faint parenchymal texture
    lungs = masks["right_lung"] | masks["left_lung"]
    organs = _distance_profile(lungs | masks["heart"], 0.07 * size)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.5 * px)
    texture *= 0.06 / (texture.std() + 1e-6)
    canvas.layer(0.8)[:] = -0.55 * lungs * (0.45 + 0.55 * organs) * (1.0 + texture)
    canvas.layer(1.0)[:] += 0.08 * masks["heart"] * organs
    canvas.paint(ellipse(*anatomy.knob, 0.03 * k, 0.028 * k), 0.06, 1.0)
    canvas.paint(anatomy.trachea(), -0.12, 1.0)
    if params.gastric_bubble:
        x_cp, x_card = anatomy.lung_base("left")
        xb = 0.5 * (x_cp + x_card)
        yb = float(np.interp(xb, anatomy.left_diaphragm[::-1, 0], anatomy.left_diaphragm[::-1, 1])) + 0.04
        canvas.paint(ellipse(xb, yb, 0.045 * k, 0.022 * k), -0.12, 2.0)
    _paint_bones(anatomy, canvas)

    findings = _findings(anatomy, frame, size)
    if params.nodule is not None:
        centre = anatomy.nodule_centre(params.nodule)
        radius = params.nodule.diameter_mm / FIELD_OF_VIEW_MM / 2
        for frac in (1.0, 0.85, 0.65, 0.4):  # stacked discs approximate a sphere's thickness profile
            canvas.paint(ellipse(*centre, radius * frac, radius * frac), 0.055, 0.6)
    density = canvas.blurred(px)
    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float32), 0.8 * px)
    density += 0.1 * _vessels(anatomy, frame, px) * lung_soft
    if params.effusion_side is not None:
        density += 0.5 * _effusion(anatomy, frame, masks, px)

    image = _expose(density, params, rng, px)
    return Phantom(image=image, masks=masks, landmarks=landmarks, findings=findings, params=params,
                   contours=contours)


def _paint_bones(anatomy: Anatomy, canvas: _Canvas) -> None:
    """Ribs (cortical rim brighter than the marrow), clavicles, spine, humeral heads."""
    posterior, anterior = anatomy.ribs()
    canvas.paint([band(c, np.full(len(c), w)) for c, w in posterior], 0.08, 0.7)
    canvas.paint([band(c, np.full(len(c), 0.45 * w)) for c, w in posterior], -0.032, 0.7)
    canvas.paint([band(c, np.full(len(c), w)) for c, w in anterior], 0.03, 1.0)
    canvas.paint([anatomy.outlines[s].polygon() for s in ("right_clavicle", "left_clavicle")], 0.1, 0.7)
    canvas.paint(anatomy.vertebrae(), 0.06, 1.0)
    p = anatomy.p
    wb = anatomy.w + p.body_fat
    heads = [ellipse(anatomy.mid + side * (wb + 0.085), anatomy.a + 0.06 + p.shoulder_drop, 0.055, 0.06)
             for side in (-1, 1)]
    canvas.paint(heads, 0.1, 1.0)


def _vessels(anatomy: Anatomy, frame: _Frame, px: float) -> np.ndarray:
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


def _effusion(anatomy: Anatomy, frame: _Frame, masks: dict[str, np.ndarray], px: float) -> np.ndarray:
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


def _findings(anatomy: Anatomy, frame: _Frame, size: int) -> dict[str, object]:
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

