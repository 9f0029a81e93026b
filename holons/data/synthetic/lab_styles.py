"""Lab styles: how other labs' chromosome images look, applied to rendered chromosomes.

Lab styles (:class:`LabStyle`, :data:`LAB_STYLES`) reproduce how other labs' images look: the
stain and band convention (G, Q, R), magnification, fixed-size padded frames, exposure, camera
noise and JPEG storage. The labels and their meaning (polarity 1 = p arm up) do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from holons.data.synthetic.chromosomes import STAINS
from holons.errors import HolonsError


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
                      summary="Q-band, bright on black, tight crop"),
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


def resolve_style(style: str | LabStyle | None = None) -> tuple[str, LabStyle]:
    """``(name, LabStyle)`` from a style name (``gband`` when None) or object (named ``custom``)."""
    if style is None:
        return "gband", LAB_STYLES["gband"]
    if isinstance(style, LabStyle):
        return "custom", style
    if style not in LAB_STYLES:
        raise HolonsError(f"unknown style {style!r}; choose one of {', '.join(LAB_STYLES)}")
    return style, LAB_STYLES[style]


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
