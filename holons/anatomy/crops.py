"""Crop boxes and their resampling into views, batched over samples and views.

Boxes are ``(x0, y0, x1, y1)`` in continuous image coordinates: pixel ``i`` covers ``[i, i + 1)``,
so the full ``H x W`` image is ``(0, 0, W, H)``. Box tensors are ``(B, 4)`` or ``(B, V, 4)``.

A view is a box, an optional rotation about its centre and an optional horizontal flip,
resampled to ``size x size`` with bilinear interpolation. Flip policy: nothing here decides to
flip; a view is mirrored only where the caller passes ``flips`` (the view generator does so only
with ``ViewConfig.hflip``, off by default for radiographs). All views of one group are read with a
single ``grid_sample`` call over the whole batch (the views are stacked along the grid's rows), so
the input batch is never copied per view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from holons.anatomy._random import log_uniform, uniform

# The areas of the paper's 8 nested local crops, as fractions of the whole W.
PAPER_LOCAL_BANDS: tuple[tuple[float, float], ...] = (
    (0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8),
)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def nested_area_bands(n: int, low: float = 0.05, high: float = 0.8) -> list[tuple[float, float]]:
    """``n`` sorted, adjacent area bands covering [low, high] (fractions of W's area).

    The first band is ``[low, high / n]`` and the others split ``[high / n, high]`` evenly, which for
    ``n = 8`` gives the paper's bands [0.05, 0.1], [0.1, 0.2], ..., [0.7, 0.8].
    """
    if n < 1:
        return []
    step = high / n
    if low < step:
        edges = [low] + [step * (i + 1) for i in range(n)]
    else:
        edges = [low + (high - low) * i / n for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def sample_boxes_in(
    container: torch.Tensor,
    area: torch.Tensor,
    aspect: torch.Tensor,
    generator: torch.Generator | None,
    position_jitter: float = 1.0,
) -> torch.Tensor:
    """Random boxes inside ``container`` boxes, ``n`` per container.

    ``container`` is ``(B, 4)``; ``area`` and ``aspect`` are ``(n, 2)`` ranges per box: area as a
    fraction of the container's area (uniform), aspect as width / height in pixels (log-uniform).
    The aspect range is narrowed where needed so the box fits at the drawn area, so the area always
    lies in its range. ``position_jitter`` 1 places the box uniformly inside the container, 0 centres
    it. Returns ``(B, n, 4)``.
    """
    b, n = container.shape[0], area.shape[0]
    device = container.device
    u = uniform((b, n, 4), generator, device)
    area = area.to(device=device, dtype=torch.float32)
    aspect = aspect.to(device=device, dtype=torch.float32)
    cx0, cy0, cx1, cy1 = (t[:, None] for t in container.unbind(-1))
    cw, ch = cx1 - cx0, cy1 - cy0
    frac = area[:, 0] + (area[:, 1] - area[:, 0]) * u[..., 0]
    pixels = frac * cw * ch
    # w = sqrt(pixels * r) <= cw and h = sqrt(pixels / r) <= ch bound the aspect r.
    r_lo = torch.maximum(aspect[:, 0].expand_as(frac), pixels / (ch * ch))
    r_hi = torch.minimum(aspect[:, 1].expand_as(frac), (cw * cw) / pixels)
    r_hi = torch.maximum(r_hi, r_lo)
    r = log_uniform(u[..., 1], r_lo, r_hi)
    w = torch.minimum(torch.sqrt(pixels * r), cw)
    h = torch.minimum(torch.sqrt(pixels / r), ch)
    jitter = 0.5 + position_jitter * (u[..., 2:] - 0.5)
    x0 = cx0 + (cw - w) * jitter[..., 0]
    y0 = cy0 + (ch - h) * jitter[..., 1]
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def global_crop_boxes(
    whole: torch.Tensor,
    n: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.8, 1.0),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """``n`` global crops of each whole (area ``scale`` of W, aspect ``aspect``): ``(B, n, 4)``."""
    area = torch.tensor([scale] * n, dtype=torch.float32)
    asp = torch.tensor([aspect] * n, dtype=torch.float32)
    return sample_boxes_in(whole, area, asp, generator)


def nested_local_boxes(
    whole: torch.Tensor,
    n: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.05, 0.8),
    tall_aspect: tuple[float, float] = (2 / 3, 1.0),
    wide_aspect: tuple[float, float] = (1.0, 3 / 2),
    position_jitter: float = 1.0,
) -> torch.Tensor:
    """``n`` local crops inside each whole, crop ``i`` with its area in band ``i`` of
    :func:`nested_area_bands` (sorted, smallest first), aspect alternating tall (even ``i``) and
    wide (odd ``i``). Returns ``(B, n, 4)``.
    """
    bands = nested_area_bands(n, *scale)
    area = torch.tensor(bands, dtype=torch.float32).reshape(n, 2)
    asp = torch.tensor([tall_aspect if i % 2 == 0 else wide_aspect for i in range(n)], dtype=torch.float32)
    return sample_boxes_in(whole, area, asp.reshape(n, 2), generator, position_jitter)


def part_local_boxes(
    parts: torch.Tensor,
    n_per_part: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.25, 0.8),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local crops inside each part: ``(B, P * n_per_part, 4)`` grouped part by part, and the
    ``(P * n_per_part,)`` index of the part each crop lies in (its teacher target)."""
    b, p = parts.shape[:2]
    area = torch.tensor([scale] * n_per_part, dtype=torch.float32)
    asp = torch.tensor([aspect] * n_per_part, dtype=torch.float32)
    boxes = sample_boxes_in(parts.reshape(b * p, 4), area, asp, generator)
    index = torch.arange(p, device=parts.device).repeat_interleave(n_per_part)
    return boxes.reshape(b, p * n_per_part, 4), index


def view_affine(
    boxes: torch.Tensor,
    image_hw: tuple[int, int],
    angles: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Affine matrices ``(..., 2, 3)`` (as for ``F.affine_grid``, align_corners=False) that map a view's
    normalized output coordinates to the box in the image, rotated by ``angles`` (degrees) about
    the box centre and mirrored left-right where ``flips`` is true. Rotation is done in pixel units,
    so a rotated view is not sheared when the image is not square."""
    h, w = image_hw
    x0, y0, x1, y1 = boxes.unbind(-1)
    hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
    cx, cy = (x0 + x1) / w - 1, (y0 + y1) / h - 1
    sx, sy = 2 * hw / w, 2 * hh / h
    if flips is not None:
        sx = torch.where(flips, -sx, sx)
    zero = torch.zeros_like(sx)
    if angles is None:
        rows = [torch.stack([sx, zero, cx], -1), torch.stack([zero, sy, cy], -1)]
    else:
        rad = angles * (math.pi / 180.0)
        cos, sin = torch.cos(rad), torch.sin(rad)
        rows = [
            torch.stack([cos * sx, -sin * (2 * hh / w), cx], -1),
            torch.stack([sin * (2 * hw / h) * torch.sign(sx), cos * sy, cy], -1),
        ]
    return torch.stack(rows, dim=-2)


def view_grid(
    boxes: torch.Tensor,
    image_hw: tuple[int, int],
    size: int,
    angles: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampling grid ``(B, V * size, size, 2)`` for ``(B, V, 4)`` boxes: the V views stacked
    along the rows, ready for one ``grid_sample`` over the ``(B, C, H, W)`` batch."""
    b, v = boxes.shape[:2]
    theta = view_affine(boxes.float(), image_hw, angles, flips)  # (B, V, 2, 3)
    # Output pixel centres in normalized coordinates, computed exactly (F.affine_grid's linspace
    # is off by an ulp, which would break the exact tiling of the parts).
    centres = (torch.arange(size, device=boxes.device, dtype=torch.float32) * 2 + 1) / size - 1
    centres = centres[None, None, :, None]
    along_x = centres * theta[:, :, None, :, 0]  # (B, V, S, 2): the column's contribution
    along_y = centres * theta[:, :, None, :, 1] + theta[:, :, None, :, 2]  # the row's, plus the centre
    return (along_y[:, :, :, None] + along_x[:, :, None]).reshape(b, v * size, size, 2)


def sample_views(
    images: torch.Tensor, grid: torch.Tensor, size: int, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Read the views of a stacked ``grid`` from ``images`` (B, C, H, W): ``(B, V, C, size, size)``."""
    b, c = images.shape[:2]
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode=padding_mode,
                        align_corners=False)
    v = grid.shape[1] // size
    return out.reshape(b, c, v, size, size).transpose(1, 2).contiguous()


def resample(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    angles: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Boxes ``(B, V, 4)`` of ``images`` (B, C, H, W) as ``(B, V, C, size, size)`` views."""
    grid = view_grid(boxes, tuple(images.shape[-2:]), size, angles, flips)
    return sample_views(images, grid, size, padding_mode)
