"""What every weakly supervised localizer shares: a backbone that maps [0, 1] canvases to a feature map,
the classification interface, and turning raw class maps into ``N x H x W`` localization maps.

A method subclasses :class:`Localizer` and implements ``logits``, ``loss`` and ``class_maps``; the
training loop, the model folder and the metrics see only this interface.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from holons.ssl.backbone import Backbone

__all__ = ["Localizer", "normalize_maps", "upsample_maps", "LossTerms"]

LossTerms = dict[str, float]
DEFAULT_INPUT_STATS = (0.5, 0.25)  # the pretraining default on [0, 1] intensities


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map (``N x ... x h x w``) to [0, 1] by its own min and max (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    lo = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - lo
    return ((flat - lo) / torch.where(span > 0, span, torch.ones_like(span))).view_as(maps)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``N x h x w`` (or ``N x K x h x w``) maps to ``size``."""
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return x[:, 0] if squeeze else x


class Localizer(nn.Module):
    """A classifier on a backbone's feature map that can say where its evidence is.

    ``images`` are ``B x 1 x H x W`` canvases in [0, 1] (``holons.data.preprocess.Preprocessing``);
    the input normalization lives in the module (buffer ``input_stats``), so a saved model needs
    nothing else. ``feature_stage`` picks the feature map: ``-1`` the last stage, ``-2`` the one
    before (twice the resolution on CNNs), and so on.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, feature_stage: int = -1,
                 input_stats: tuple[float, float] | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a localizer needs at least two classes, got {num_classes}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.feature_stage = int(feature_stage)
        channels = backbone.feature_channels()
        if not -len(channels) <= self.feature_stage < 0:
            raise ValueError(f"feature_stage must be within -{len(channels)}..-1 for {backbone.name}, "
                             f"got {feature_stage}")
        self.channels = int(channels[self.feature_stage])
        stats = input_stats or backbone.recorded_input_stats() or DEFAULT_INPUT_STATS
        self.register_buffer("input_stats", torch.tensor([float(stats[0]), float(stats[1])]))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] canvases to the backbone's input scale."""
        return (images - self.input_stats[0]) / self.input_stats[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The chosen feature map ``B x C x h x w`` of [0, 1] canvases."""
        x = self.normalize(images)
        if self.feature_stage == -1:
            return self.backbone.forward_dense(x)
        index = len(self.backbone.feature_channels()) + self.feature_stage
        return self.backbone.forward_pyramid(x, indices=[index])[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``B x K``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *,
             progress: float) -> tuple[torch.Tensor, LossTerms]:
        """The method's training objective on one batch and its named terms (floats, for the log);
        ``progress`` is the share of training done, in [0, 1) (schedules read it)."""
        raise NotImplementedError

    def class_maps(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Raw evidence for class ``target[i]`` over the image, ``B x h x w`` (any resolution, any scale)."""
        raise NotImplementedError

    @torch.no_grad()
    def localization_map(self, images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Maps in [0, 1] at the input's resolution, ``N x H x W``, for class ``target`` (default: the
        predicted class)."""
        if target is None:
            target = self.logits(images).argmax(dim=1)
        maps = self.class_maps(images, target.to(images.device).long())
        return normalize_maps(upsample_maps(maps, tuple(images.shape[-2:])))

    def describe(self) -> dict[str, Any]:
        """The constructor options a model folder records to rebuild this module."""
        return {}
