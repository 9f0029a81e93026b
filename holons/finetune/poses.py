"""Random rigid poses of images, shared by the methods that need one: PDiscoNet's equivariance prior
and siamese augmentation in dataset distillation. A pose is a ``2 x 3`` affine matrix in
``affine_grid``'s convention (output -> input coordinates in [-1, 1]), so the same matrix means the
same motion at any resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_rigid_thetas", "rigid_transform"]


def random_rigid_thetas(n: int, *, max_degrees: float = 15.0, max_shift: float = 0.1,
                        scale_range: tuple[float, float] = (0.9, 1.1), flip: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``n x 2 x 3`` affine matrices (``affine_grid`` convention: output -> input coordinates in
    [-1, 1]) of random rotations, horizontal flips, shifts and isotropic scales."""
    u = torch.rand(n, 5, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_degrees)
    scale = scale_range[0] + u[:, 1] * (scale_range[1] - scale_range[0])
    mirror = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
    theta[:, :, 2] = (u[:, 3:5] * 2 - 1) * max_shift
    return theta


def rigid_transform(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``B x C x H x W`` by ``theta`` (``B x 2 x 3``); outside the source is zero. Normalized
    coordinates make the same ``theta`` mean the same motion at any resolution."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
