"""Progressive Patch Learning (after Li et al.): the feature map is cut into ``k x k`` patches, each
patch is classified on its own by one shared head, and the patch predictions are aggregated.

Each patch must find evidence for the image's class in its own region, so weak parts of an object
count, not just the single most discriminative one. Training runs in stages of growing granularity
(``granularities``, default 1 -> 2 -> 4, equal shares of the steps; each stage continues from the
last). ``fusion=True`` is the explicit multi-granularity variant: every granularity at once, logits
averaged. The shared head is two 1x1 convolutions (a linear head would make the mean of patch logits
equal the global logit, so patches would learn nothing of their own); applied at every position of
the full feature map it gives the class activation map of the final model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from holons.finetune.localize.base import Localizer, LossTerms
from holons.ssl.backbone import Backbone

__all__ = ["PPLLocalizer", "ppl_granularity"]

AGGREGATES = ("mean", "max")


def ppl_granularity(progress: float, granularities: Sequence[int]) -> int:
    """The granularity of the stage at ``progress`` (share of training done): equal shares per stage."""
    stage = min(max(int(progress * len(granularities)), 0), len(granularities) - 1)
    return int(granularities[stage])


class PPLLocalizer(Localizer):
    """Shared patch classifier over ``k x k`` patches, stages of growing ``k``."""

    def __init__(self, backbone: Backbone, num_classes: int, *, granularities: Sequence[int] = (1, 2, 4),
                 aggregate: str = "mean", fusion: bool = False, patch_weight: float = 0.5,
                 hidden: int = 256, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if not granularities or any(int(k) < 1 for k in granularities):
            raise ValueError(f"granularities must be positive integers, got {list(granularities)}")
        self.granularities = [int(k) for k in granularities]
        self.aggregate, self.fusion, self.patch_weight = aggregate, bool(fusion), float(patch_weight)
        self.hidden = int(hidden)
        self.patch_head = nn.Sequential(nn.Conv2d(self.channels, self.hidden, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(self.hidden, num_classes, 1))

    def patch_logits(self, feats: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of every patch of a ``k x k`` cut, ``B x K x k x k``."""
        return self.patch_head(F.adaptive_avg_pool2d(feats, k))

    def _aggregate(self, patches: torch.Tensor) -> torch.Tensor:
        flat = patches.flatten(2)
        return flat.mean(dim=2) if self.aggregate == "mean" else flat.amax(dim=2)

    def _granularities(self, progress: float | None) -> list[int]:
        if self.fusion:
            return self.granularities
        return [self.granularities[-1] if progress is None else ppl_granularity(progress, self.granularities)]

    def logits(self, images: torch.Tensor, progress: float | None = None) -> torch.Tensor:
        """Aggregated patch logits at the stage's granularity (inference: the last one; fusion: all of
        them, averaged)."""
        feats = self.features(images)
        return torch.stack([self._aggregate(self.patch_logits(feats, k))
                            for k in self._granularities(progress)]).mean(dim=0)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *,
             progress: float) -> tuple[torch.Tensor, LossTerms]:
        feats = self.features(images)
        image_logits, patch_ce = [], []
        for k in self._granularities(progress):
            patches = self.patch_logits(feats, k)
            image_logits.append(self._aggregate(patches))
            per_patch = patches.flatten(2).transpose(1, 2).reshape(-1, self.num_classes)
            patch_ce.append(F.cross_entropy(per_patch, labels.repeat_interleave(k * k)))
        ce = F.cross_entropy(torch.stack(image_logits).mean(dim=0), labels)
        patch = torch.stack(patch_ce).mean()
        return ce + self.patch_weight * patch, {"ce": ce.item(), "patch_ce": patch.item()}

    def class_maps(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dense = self.patch_head(self.features(images))
        return dense[torch.arange(len(target), device=dense.device), target]

    def describe(self) -> dict:
        return {"granularities": self.granularities, "aggregate": self.aggregate, "fusion": self.fusion,
                "patch_weight": self.patch_weight, "hidden": self.hidden}
