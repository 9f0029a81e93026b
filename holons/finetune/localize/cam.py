"""The baseline: global average pooling + one linear classifier; the map is the class activation map
(Zhou et al., 2016): ``CAM_k = sum_c w_kc F_c``, whose spatial mean is the class logit (up to the bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from holons.finetune.localize.base import Localizer, LossTerms
from holons.ssl.backbone import Backbone

__all__ = ["CAMLocalizer"]


class CAMLocalizer(Localizer):
    """GAP + linear head; cross-entropy; maps by CAM."""

    def __init__(self, backbone: Backbone, num_classes: int, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.head = nn.Linear(self.channels, num_classes)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *,
             progress: float) -> tuple[torch.Tensor, LossTerms]:
        loss = F.cross_entropy(self.logits(images), labels)
        return loss, {"ce": loss.item()}

    def class_maps(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,bc->bhw", self.features(images), self.head.weight[target])
