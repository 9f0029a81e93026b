"""One preprocessing contract for radiographs: how a source image becomes a network input, and back.

The cache (hence pretraining), fine-tuning, ``holons predict`` and every evaluation protocol prepare
images with :class:`Preprocessing`; exports and model folders record it in their ``config.json``
under ``"preprocessing"`` (:meth:`Preprocessing.to_dict`) and read it back from there
(:meth:`Preprocessing.from_dict`), so a model meets the geometry and intensities it was trained on.

Fields:

- ``size``: side of the square network input, in pixels.
- ``resize``: ``letterbox`` keeps the aspect ratio (longer side = ``size``, centred on a zero
  canvas; what the cache has always stored) or ``stretch`` scales each axis to ``size`` (a
  non-square radiograph is distorted).
- ``voi``: how stored values become [0, 1] (``read_image``'s VOI policy: ``window`` from the
  file's own window / display range, ``percentile`` 0.5-99.5 %, or ``minmax``).
- ``intensity``: ``voi`` keeps the reader's [0, 1] values; ``percentile`` stretches them again to
  the image's own 0.5-99.5 % range (for archives whose windows are unreliable).

:class:`Geometry` records where the source image sits on the canvas and maps points and masks
both ways. Coordinates are continuous, with the origin at the top-left corner of the top-left
pixel (a pixel centre is at i + 0.5), the convention in which resizing is a pure scale.
Resampling is PIL's bilinear filter, whose support widens when shrinking (antialiased).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from holons.errors import HolonsError

ResizeMode = Literal["letterbox", "stretch"]
IntensityMode = Literal["voi", "percentile"]
RESIZE_MODES = ("letterbox", "stretch")
INTENSITY_MODES = ("voi", "percentile")
VOI_POLICIES = ("window", "percentile", "minmax")


@dataclass(frozen=True)
class Geometry:
    """Where a source image (``orig_h x orig_w``) sits on the network canvas.

    ``scale_y, scale_x``: canvas pixels per source pixel; ``pad_top, pad_left``: the content's
    offset on the canvas; ``content_h x content_w``: the content's size on the canvas.
    """

    orig_h: int
    orig_w: int
    scale_y: float
    scale_x: float
    pad_top: int
    pad_left: int
    content_h: int
    content_w: int

    @classmethod
    def from_row(cls, row: Any) -> Geometry:
        """The geometry stored in a cache index row (or any mapping with these keys)."""
        return cls(**{f.name: (int if f.type == "int" else float)(row[f.name]) for f in fields(cls)})

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def to_source(self, xy: np.ndarray) -> np.ndarray:
        """Map (x, y) points from canvas to source pixel coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([(xy[..., 0] - self.pad_left) / self.scale_x,
                         (xy[..., 1] - self.pad_top) / self.scale_y], axis=-1)

    def from_source(self, xy: np.ndarray) -> np.ndarray:
        """Map (x, y) points from source to canvas pixel coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([xy[..., 0] * self.scale_x + self.pad_left,
                         xy[..., 1] * self.scale_y + self.pad_top], axis=-1)

    def map_to_source(self, values: np.ndarray) -> np.ndarray:
        """A per-pixel map on the canvas (``... x size x size``, e.g. probabilities) resampled onto
        the source grid (``... x orig_h x orig_w``); the padding is dropped. Threshold afterwards
        for a mask."""
        values = np.asarray(values, dtype=np.float32)
        content = values[..., self.pad_top:self.pad_top + self.content_h,
                         self.pad_left:self.pad_left + self.content_w]
        return _resize_stack(content, self.orig_h, self.orig_w)


def _resize_stack(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the last two axes of a float32 stack to ``height x width`` (PIL bilinear)."""
    from PIL import Image

    if values.shape[-2:] == (height, width):
        return values.astype(np.float32, copy=True)
    flat = values.reshape(-1, *values.shape[-2:])
    out = np.empty((flat.shape[0], height, width), dtype=np.float32)
    for i, plane in enumerate(flat):
        image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
        out[i] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return out.reshape(*values.shape[:-2], height, width)


@dataclass(frozen=True)
class Preprocessing:
    """How a radiograph becomes a ``size x size`` float32 network input in [0, 1] (module docstring)."""

    size: int = 224
    resize: ResizeMode = "letterbox"
    voi: str = "window"
    intensity: IntensityMode = "voi"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 8:
            raise HolonsError(f"preprocessing size must be an integer >= 8, got {self.size!r}")
        choices = (("resize", RESIZE_MODES), ("voi", VOI_POLICIES), ("intensity", INTENSITY_MODES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise HolonsError(f"preprocessing {name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """Read back what :meth:`to_dict` wrote; an unknown key is named in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise HolonsError(f"unknown preprocessing key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**values)

    def apply(self, pixels: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """A decoded H x W image in [0, 1] -> (``size x size`` float32 canvas, its geometry)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 2 or min(pixels.shape) < 1:
            raise HolonsError(f"expected an H x W image, got shape {pixels.shape}")
        if self.intensity == "percentile":
            from holons.data.image import percentile_range, scale_to_unit

            pixels = scale_to_unit(pixels, *percentile_range(pixels))
        geometry = self.geometry(*pixels.shape)
        canvas = np.zeros((self.size, self.size), dtype=np.float32)
        canvas[geometry.pad_top:geometry.pad_top + geometry.content_h,
               geometry.pad_left:geometry.pad_left + geometry.content_w] = _resize_stack(
            pixels, geometry.content_h, geometry.content_w)
        return canvas, geometry

    def geometry(self, height: int, width: int) -> Geometry:
        """Where an ``height x width`` source lands on the canvas."""
        if self.resize == "stretch":
            content_h = content_w = self.size
        else:
            scale = self.size / max(height, width)
            content_h = min(self.size, max(1, round(height * scale)))
            content_w = min(self.size, max(1, round(width * scale)))
        pad_top, pad_left = (self.size - content_h) // 2, (self.size - content_w) // 2
        return Geometry(orig_h=int(height), orig_w=int(width), scale_y=content_h / height,
                        scale_x=content_w / width, pad_top=pad_top, pad_left=pad_left,
                        content_h=content_h, content_w=content_w)

    def mask(self, masks: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Source-grid masks (``... x H x W``, bool) placed on the canvas like the image (bool)."""
        values = np.asarray(masks, dtype=np.float32)
        canvas = np.zeros((*values.shape[:-2], self.size, self.size), dtype=np.float32)
        canvas[..., geometry.pad_top:geometry.pad_top + geometry.content_h,
               geometry.pad_left:geometry.pad_left + geometry.content_w] = _resize_stack(
            values, geometry.content_h, geometry.content_w)
        return canvas > 0.5

    def read(self, path: str | Path) -> tuple[np.ndarray, Geometry]:
        """Read an image file (any format ``read_image`` knows) and prepare it."""
        from holons.data.readers import read_image

        return self.apply(read_image(path, voi=self.voi).pixels)
