"""CutMix-style regional mixing with the exact, clipped-area lambda.

lambda ~ Beta(alpha, alpha); a box with sides sqrt(1 - lambda) of the image's, at a uniformly
random centre, is clipped at the border and rounded to whole pixels; the partner's pixels are
pasted there, and lambda is recomputed from the clipped box, so ``1 - lambda`` is exactly the
fraction of pasted pixels. Targets then mix as ``lambda * y_A + (1 - lambda) * y_B`` (in
pretraining: the teacher's distributions, see :func:`mix_targets`).

For sparse foreground on a blank background (chromosomes), :func:`foreground_lambda` weighs by the
foreground pixels that come from each image instead of by area.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from holons.anatomy._random import permutation, uniform
from holons.errors import ConfigError, HolonsError


@dataclass
class CutMixConfig:
    """Regional mixing knobs.

    ``mode: box`` pastes a CutMix box into each student crop (probability ``prob`` per crop) from
    the partner's pixels at the same position relative to the whole; the crop's teacher target is
    then ``lambda * p_T(A) + (1 - lambda) * p_T(B)``. ``snap_to_grid`` snaps the box edges to the
    crop's k x k grid. ``mode: parts`` instead swaps a random non-empty, proper subset of W's parts
    with the partner's (probability ``prob`` per sample) and cuts every view from that mixed
    whole, so the teacher's targets of the mixed whole (and its parts) need no mixing.
    """

    prob: float = 0.0
    alpha: float = 1.0
    mode: Literal["box", "parts"] = "box"
    snap_to_grid: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"cutmix.prob must be in [0, 1], got {self.prob}")
        if self.alpha <= 0:
            raise ConfigError(f"cutmix.alpha must be > 0, got {self.alpha}")
        if self.mode not in ("box", "parts"):
            raise ConfigError(f"cutmix.mode must be box or parts, got {self.mode!r}")


@dataclass
class CutMixResult:
    images: torch.Tensor
    """Mixed images, same shape as the input."""
    lam: torch.Tensor
    """(N,) fraction of each image's pixels that are its own (1 where not mixed)."""
    partner: torch.Tensor
    """(N,) index of the image each box came from."""
    boxes: torch.Tensor
    """(N, 4) pasted boxes (x0, y0, x1, y1) in whole pixels; empty (x0 == x1) where not mixed."""
    applied: torch.Tensor
    """(N,) whether a box was drawn for the image."""


def sample_partner(n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """A random pairing without fixed points (for n > 1): image i takes its box from ``partner[i]``."""
    device = torch.device(device)
    order = permutation(n, generator, device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def sample_lambda(
    n: int, alpha: float, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha) by inverse CDF of generator-driven uniforms (reproducible)."""
    u = uniform((n,), generator, torch.device("cpu"))
    if alpha != 1.0:
        from scipy.special import betaincinv

        u = torch.from_numpy(betaincinv(alpha, alpha, u.double().numpy())).float()
    return u.to(device)


def cutmix_boxes(
    lam: torch.Tensor,
    image_hw: tuple[int, int],
    generator: torch.Generator | None,
    grid_k: int | None = None,
) -> torch.Tensor:
    """Boxes with sides ``sqrt(1 - lam)`` of the image at uniform centres, clipped, in whole pixels.

    With ``grid_k`` the edges snap to the nearest lines of a grid_k x grid_k grid of the image.
    Returns ``(N, 4)`` float boxes with integer values.
    """
    h, w = image_hw
    size = torch.tensor([float(w), float(h)], device=lam.device)
    centre = uniform((lam.shape[0], 2), generator, lam.device) * size
    half = torch.sqrt((1.0 - lam).clamp(0.0, 1.0))[:, None] * size / 2
    lo = torch.minimum(torch.maximum(centre - half, torch.zeros_like(size)), size)
    hi = torch.minimum(torch.maximum(centre + half, torch.zeros_like(size)), size)
    if grid_k is not None:
        cell = size / grid_k
        lo, hi = torch.round(lo / cell) * cell, torch.round(hi / cell) * cell
    lo, hi = torch.round(lo), torch.round(hi)
    return torch.cat([lo, hi], dim=-1)


def box_masks(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """``(N, 1, H, W)`` masks of the pixels whose centres lie in the ``(N, 4)`` boxes."""
    h, w = image_hw
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def cutmix(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    prob: float = 1.0,
    alpha: float = 1.0,
    partner: torch.Tensor | None = None,
    partner_images: torch.Tensor | None = None,
    grid_k: int | None = None,
) -> CutMixResult:
    """CutMix over a batch ``(N, C, H, W)`` (any size, any channels).

    ``partner`` (N,) defaults to :func:`sample_partner`; ``partner_images`` (the pixels to paste,
    aligned with ``images``) defaults to ``images[partner]``. Each image is mixed with probability
    ``prob``; ``prob = 0`` returns the input unchanged.
    """
    if images.dim() != 4:
        raise HolonsError(f"cutmix expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    device = images.device
    if partner is None:
        partner = sample_partner(n, generator, device)
    if prob <= 0:
        return CutMixResult(images, torch.ones(n, device=device), partner, torch.zeros(n, 4, device=device),
                            torch.zeros(n, dtype=torch.bool, device=device))
    if partner_images is None:
        partner_images = images[partner]
    applied = uniform((n,), generator, device) < prob
    boxes = cutmix_boxes(sample_lambda(n, alpha, generator, device), (h, w), generator, grid_k)
    boxes = torch.where(applied[:, None], boxes, torch.zeros_like(boxes))
    lam = 1.0 - (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (h * w)
    mixed = torch.where(box_masks(boxes, (h, w)), partner_images, images)
    return CutMixResult(mixed, lam, partner, boxes, applied)


def mix_targets(targets: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``lam * targets + (1 - lam) * targets[partner]``, broadcast over views.

    ``targets`` is ``(B, K)`` (one target per sample) or ``(B, V, K)`` (one per view); ``lam`` is
    ``(B,)`` or ``(B, V)``. With probability vectors the result is again a distribution.
    """
    lam = lam.to(targets.dtype)[..., None]
    if targets.dim() < lam.dim():
        targets = targets.unsqueeze(1)
    return lam * targets + (1.0 - lam) * targets[partner]


def foreground_lambda(
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    paste_mask: torch.Tensor,
    threshold: float = 0.5,
    foreground: Literal["above", "below"] = "above",
    foreground_a: torch.Tensor | None = None,
    foreground_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fraction of the mixed image's foreground pixels that come from A, per sample ``(N,)``.

    ``image_a``/``image_b`` are ``(N, C, H, W)``; ``paste_mask`` (N, 1, H, W) or (N, H, W) is true
    where B's pixels were pasted. Foreground is ``image > threshold`` (``foreground="below"``: dark
    objects on a bright background) in any channel, or the given boolean masks. Where the mixed
    image has no foreground at all, the area lambda is returned.
    """
    def fg(image: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        if given is not None:
            return given.reshape(image.shape[0], -1, *image.shape[-2:]).any(dim=1)
        hit = image > threshold if foreground == "above" else image < threshold
        return hit.any(dim=1)

    paste = paste_mask.reshape(image_a.shape[0], -1, *image_a.shape[-2:]).any(dim=1)
    from_a = (fg(image_a, foreground_a) & ~paste).flatten(1).sum(1).float()
    from_b = (fg(image_b, foreground_b) & paste).flatten(1).sum(1).float()
    total = from_a + from_b
    area = 1.0 - paste.flatten(1).float().mean(1)
    return torch.where(total > 0, from_a / total.clamp_min(1.0), area)


def sample_part_swaps(
    batch: int, k: int, prob: float, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """``(B, k*k)`` masks of the parts to take from the partner: with probability ``prob`` a
    uniformly sized, random non-empty proper subset of the parts, otherwise none."""
    device = torch.device(device)
    p = k * k
    u = uniform((batch, p + 2), generator, device)
    if p < 2:
        return torch.zeros(batch, p, dtype=torch.bool, device=device)
    count = 1 + torch.floor(u[:, 0] * (p - 1)).clamp(max=p - 2)
    ranks = u[:, 2:].argsort(dim=1).argsort(dim=1)
    return (ranks < count[:, None]) & (u[:, 1:2] < prob)
