"""Anatomy decomposer: the whole W at a granularity level and its k x k parts.

At level ``g = 0`` the whole is the full image. At ``g >= 1`` it is a random crop whose sides are
``1 / 2**g`` of the image's (area ``1 / 4**g``), placed at integer pixel offsets and kept
``margin`` (a fraction of the image side) away from the border where there is room.

**Part order contract.** The whole is cut into a k x k grid of equal parts, numbered in raster
order: row by row from the top, left to right within a row. For k = 2 that is
``0 = top-left, 1 = top-right, 2 = bottom-left, 3 = bottom-right``; part ``i`` is in row
``i // k`` and column ``i % k``. The composition and decomposition heads concatenate and split
embeddings in this order, so it is part of the trained model and must never change.
"""

from __future__ import annotations

import torch

from holons.anatomy._random import uniform
from holons.errors import HolonsError

PART_ORDER_2X2: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")


def part_position(index: int, k: int) -> tuple[int, int]:
    """``(row, column)`` of part ``index`` in the k x k raster order."""
    return divmod(index, k)


def whole_side(image_side: float, level: int) -> float:
    """Side of the whole at ``level``: ``image_side / 2**level``."""
    return image_side / (2**level)


def whole_boxes(
    batch: int,
    image_hw: tuple[int, int],
    level: int,
    generator: torch.Generator | None = None,
    margin: float = 0.05,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The whole W of each sample at ``level``: ``(batch, 4)`` boxes ``(x0, y0, x1, y1)``."""
    h, w = image_hw
    if level < 0:
        raise HolonsError(f"granularity level must be >= 0, got {level}")
    if min(h, w) / (2**level) < 1:
        raise HolonsError(f"level {level} leaves a whole under one pixel of a {h}x{w} image")
    device = torch.device(device)
    if level == 0:
        return torch.tensor([0.0, 0.0, float(w), float(h)], device=device).expand(batch, 4).clone()
    sides = torch.tensor([whole_side(w, level), whole_side(h, level)], device=device)
    room = torch.tensor([float(w), float(h)], device=device) - sides
    keep = torch.minimum(torch.tensor([margin * w, margin * h], device=device), room / 2)
    u = uniform((batch, 2), generator, device)
    start = torch.round(keep + u * (room - 2 * keep))
    start = torch.minimum(torch.clamp(start, min=0.0), room)
    return torch.cat([start, start + sides], dim=-1)


def part_boxes(whole: torch.Tensor, k: int) -> torch.Tensor:
    """The k x k parts of each whole ``(B, 4)`` in raster order: ``(B, k*k, 4)``.

    Neighbouring parts share their edges exactly and the outer edges are the whole's, so the part
    boxes partition the whole box.
    """
    if k < 1:
        raise HolonsError(f"parts per side k must be >= 1, got {k}")
    x0, y0, x1, y1 = (t[:, None] for t in whole.unbind(-1))
    t = torch.arange(k + 1, device=whole.device, dtype=whole.dtype) / k
    xs = x0 + (x1 - x0) * t
    ys = y0 + (y1 - y0) * t
    xs[:, 0], xs[:, k] = x0[:, 0], x1[:, 0]
    ys[:, 0], ys[:, k] = y0[:, 0], y1[:, 0]
    row = torch.arange(k, device=whole.device).repeat_interleave(k)
    col = torch.arange(k, device=whole.device).repeat(k)
    return torch.stack([xs[:, col], ys[:, row], xs[:, col + 1], ys[:, row + 1]], dim=-1)


def part_cells(
    grid_xy: torch.Tensor, whole: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which part of W each image point ``grid_xy`` (B, ..., 2, pixel units) falls in.

    Returns the raster part index (clamped to a valid index) and a mask of points inside W.
    """
    b = whole.shape[0]
    shape = (b,) + (1,) * (grid_xy.dim() - 2)
    x0, y0, x1, y1 = (t.reshape(shape) for t in whole.unbind(-1))
    col = torch.floor((grid_xy[..., 0] - x0) * k / (x1 - x0))
    row = torch.floor((grid_xy[..., 1] - y0) * k / (y1 - y0))
    inside = (col >= 0) & (col < k) & (row >= 0) & (row < k)
    index = (row.clamp(0, k - 1) * k + col.clamp(0, k - 1)).long()
    return index, inside
