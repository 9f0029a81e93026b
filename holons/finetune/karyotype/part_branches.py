"""Local branches of the karyotype model built from discovered parts, alternatives to the Varifocal
zoom (issue 20's part-crop ablation; variants ``sgma_parts`` and ``pdisconet_parts``).

- :class:`AttentionCrops` (after SGMA): ``parts`` attention maps from G-Net's last feature map (a 1x1
  convolution, softmax over space); around each map's centroid a square of ``crop_fraction`` of the
  canvas is cut from the source and zoomed to the L-Net's input; the L-Net encodes every crop and the
  part features are averaged. The attention learns where to look from the L-Net's loss (the crop is
  differentiable in its centre), with a diversity term that keeps the maps apart.
- :class:`DiscoveredParts` (after PDiscoNet): the L-Net sees the whole canvas at the G-Net's input
  size; ``parts`` part maps plus a background map come from its last feature map; each part vector is
  the attention-weighted mean of the features times its own modulation vector, and the L feature is
  the mean of the part vectors (whole parts dropped with ``part_dropout`` in training), so the L heads
  classify as PDiscoNet's shared classifier averaged over parts. Concentration, orthogonality and
  presence priors are its auxiliary loss.

Each branch returns its auxiliary loss (already weighted);
:func:`~holons.finetune.karyotype.losses.phase_loss` adds it while the L-Net trains. The losses and
the crop are those of :mod:`holons.finetune.localize`.
"""

from __future__ import annotations

import torch
from torch import nn

from holons.finetune.localize.pdisconet import concentration_loss, orthogonality_loss, presence_loss
from holons.finetune.localize.sgma import attention_diversity, crop_boxes, zoom_crops


class AttentionCrops(nn.Module):
    """Where to crop: ``parts`` attention maps of a feature map, and the zoomed crops around them."""

    def __init__(self, channels: int, parts: int, crop_fraction: float, loss_weight: float) -> None:
        super().__init__()
        self.parts, self.crop_fraction = int(parts), float(crop_fraction)
        self.loss_weight = float(loss_weight)
        self.attention = nn.Conv2d(channels, self.parts, 1)

    def maps(self, dense: torch.Tensor) -> torch.Tensor:
        """``B x P x h x w`` attention maps, each summing to one over space."""
        b = dense.shape[0]
        return self.attention(dense).flatten(2).softmax(dim=2).view(b, self.parts, *dense.shape[-2:])

    def crops(self, source: torch.Tensor, maps: torch.Tensor, size: int) -> torch.Tensor:
        """``(B * P) x 1 x size x size`` crops of ``source`` around the maps' centroids."""
        return zoom_crops(source, crop_boxes(maps, "soft"), self.crop_fraction, size)

    def loss(self, maps: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * attention_diversity(maps)


class DiscoveredParts(nn.Module):
    """PDiscoNet's parts on a feature map: part maps (+ background), modulated part vectors, their mean."""

    def __init__(self, channels: int, parts: int, part_dropout: float, loss_weight: float) -> None:
        super().__init__()
        self.parts, self.part_dropout, self.loss_weight = int(parts), float(part_dropout), float(loss_weight)
        self.part_conv = nn.Conv2d(channels, self.parts + 1, 1)
        self.modulation = nn.Parameter(torch.ones(self.parts, channels))

    def forward(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The L feature ``B x C``, the maps ``B x (P + 1) x h x w`` (background last) and the part
        vectors ``B x P x C`` of a feature map ``B x C x h x w``."""
        maps = self.part_conv(dense).softmax(dim=1)
        parts = maps[:, :-1]
        mass = parts.sum(dim=(2, 3))[..., None].clamp_min(1e-6)
        vectors = torch.einsum("bkhw,bchw->bkc", parts, dense) / mass
        modulated = vectors * self.modulation
        keep = torch.ones(modulated.shape[:2], device=dense.device, dtype=dense.dtype)
        if self.training and self.part_dropout > 0:
            keep = (torch.rand_like(keep) >= self.part_dropout).to(dense.dtype)
            keep[keep.sum(dim=1) == 0, 0] = 1.0  # at least one part votes
        feature = (modulated * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)
        return feature, maps, vectors

    def loss(self, maps: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        priors = concentration_loss(maps[:, :-1]) + orthogonality_loss(vectors) + presence_loss(maps)
        return self.loss_weight * priors
