"""PDiscoNet: part discovery with priors (after van der Klis et al.).

``parts`` part maps plus a background map come from a softmax over ``parts + 1`` channels of a 1x1
convolution of the feature map. Each part's vector is the attention-weighted mean of the features,
multiplied by its own learned modulation vector and classified by one shared linear classifier; the
part logits are averaged. In training whole parts are dropped (``part_dropout``), so no single part
carries the decision. The priors are losses, each a function here so it can be tested alone:

- concentration: the spatial variance of each part map (a part is one compact region);
- orthogonality: part vectors of an image are distinct (squared cosines between them);
- equivariance: the maps of a rigidly transformed image (rotation, flip, translation, scale) equal
  the transformed maps;
- presence: every part is strongly present somewhere in the batch, and the background is present
  at the image border.

The localization map weighs the part maps by each part's share of the target class's logit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from holons.finetune.localize.base import Localizer, LossTerms
from holons.finetune.poses import random_rigid_thetas, rigid_transform
from holons.ssl.backbone import Backbone

__all__ = ["PDiscoNetLocalizer", "concentration_loss", "orthogonality_loss", "presence_loss",
           "equivariance_loss", "rigid_transform", "random_rigid_thetas"]


def _grid(h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
    return ys, xs


def concentration_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean spatial variance of ``B x K x h x w`` non-negative maps, each seen as a distribution over
    positions in the unit square (0 for a single-pixel map, about 1/6 for a uniform one)."""
    b, k, h, w = maps.shape
    p = maps / maps.sum(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    ys, xs = _grid(h, w, maps)
    py, px = p.sum(dim=3), p.sum(dim=2)
    my, mx = (py * ys).sum(dim=2, keepdim=True), (px * xs).sum(dim=2, keepdim=True)
    return ((py * (ys - my) ** 2).sum(dim=2) + (px * (xs - mx) ** 2).sum(dim=2)).mean()


def orthogonality_loss(vectors: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between distinct part vectors of each image (``B x K x C``; 0 when orthogonal)."""
    v = F.normalize(vectors, dim=2)
    gram = v @ v.transpose(1, 2)
    k = v.shape[1]
    off = gram - torch.diag_embed(gram.diagonal(dim1=1, dim2=2))
    return off.pow(2).sum(dim=(1, 2)).mean() / max(k * (k - 1), 1)


def presence_loss(maps: torch.Tensor, border: int = 1) -> torch.Tensor:
    """``B x (K + 1) x h x w`` maps (background last): ``1 - max`` over the batch and space of each part
    (3x3-averaged, so a single hot pixel is not enough), plus ``1 - max`` of the background over the
    ``border`` outermost rows and columns of each image."""
    parts, background = maps[:, :-1], maps[:, -1]
    pooled = F.avg_pool2d(parts, 3, stride=1, padding=1, count_include_pad=False)
    part_term = (1 - pooled.amax(dim=(0, 2, 3))).mean()
    edge = torch.ones_like(background, dtype=torch.bool)
    edge[:, border:-border, border:-border] = False
    bg_term = (1 - background.masked_fill(~edge, 0).flatten(1).amax(dim=1)).mean()
    return part_term + bg_term


def equivariance_loss(map_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                      theta: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between ``map_fn(T(images))`` and ``T(map_fn(images))`` where both see
    the image (positions that ``T`` fills from outside the source are left out); 0 for an equivariant
    ``map_fn``."""
    of_moved = map_fn(rigid_transform(images, theta))
    moved = rigid_transform(map_fn(images), theta)
    valid = rigid_transform(torch.ones_like(moved[:, :1]), theta) > 0.99
    diff = (of_moved - moved).abs() * valid
    return diff.sum() / (valid.sum() * moved.shape[1]).clamp_min(1)


class PDiscoNetLocalizer(Localizer):
    """Parts + background by attention, modulated part vectors, one shared classifier, priors as losses."""

    def __init__(self, backbone: Backbone, num_classes: int, *, parts: int = 4, part_dropout: float = 0.3,
                 concentration_weight: float = 1.0, orthogonality_weight: float = 1.0,
                 equivariance_weight: float = 1.0, presence_weight: float = 1.0, max_degrees: float = 15.0,
                 flip: bool = True, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        if parts < 1 or not 0 <= part_dropout < 1:
            raise ValueError(f"need parts >= 1 and 0 <= part_dropout < 1, got {parts} and {part_dropout}")
        self.parts, self.part_dropout = int(parts), float(part_dropout)
        self.weights = {"concentration": float(concentration_weight),
                        "orthogonality": float(orthogonality_weight),
                        "equivariance": float(equivariance_weight), "presence": float(presence_weight)}
        self.max_degrees, self.flip = float(max_degrees), bool(flip)
        self.part_conv = nn.Conv2d(self.channels, self.parts + 1, 1)
        self.modulation = nn.Parameter(torch.ones(self.parts, self.channels))
        self.classifier = nn.Linear(self.channels, num_classes)

    def part_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``B x (K + 1) x h x w`` maps summing to one at each position (background last)."""
        return self.part_conv(self.features(images)).softmax(dim=1)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        maps = self.part_conv(feats).softmax(dim=1)
        parts = maps[:, :-1]
        mass = parts.sum(dim=(2, 3))[..., None].clamp_min(1e-6)
        vectors = torch.einsum("bkhw,bchw->bkc", parts, feats) / mass
        part_logits = self.classifier(vectors * self.modulation)
        keep = torch.ones(part_logits.shape[:2], device=images.device)
        if self.training and self.part_dropout > 0:
            keep = (torch.rand_like(keep) >= self.part_dropout).float()
            keep[keep.sum(dim=1) == 0, 0] = 1.0  # at least one part votes
        logits = (part_logits * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)
        return {"maps": maps, "vectors": vectors, "part_logits": part_logits, "logits": logits}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)["logits"]

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *,
             progress: float) -> tuple[torch.Tensor, LossTerms]:
        out = self._forward(images)
        terms = {"ce": F.cross_entropy(out["logits"], labels),
                 "concentration": concentration_loss(out["maps"][:, :-1]),
                 "orthogonality": orthogonality_loss(out["vectors"]),
                 "presence": presence_loss(out["maps"])}
        if self.weights["equivariance"] > 0:
            theta = random_rigid_thetas(len(images), max_degrees=self.max_degrees, flip=self.flip)
            terms["equivariance"] = equivariance_loss(self.part_maps, images, theta.to(images.device))
        total = terms["ce"] + sum(self.weights[k] * v for k, v in terms.items() if k != "ce")
        return total, {k: v.item() for k, v in terms.items()}

    def class_maps(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self._forward(images)
        share = out["part_logits"][torch.arange(len(target), device=images.device), :, target].softmax(dim=1)
        return torch.einsum("bk,bkhw->bhw", share, out["maps"][:, :-1])

    def describe(self) -> dict:
        return {"parts": self.parts, "part_dropout": self.part_dropout,
                **{f"{k}_weight": v for k, v in self.weights.items()},
                "max_degrees": self.max_degrees, "flip": self.flip}
