"""The small ConvNet of the dataset-distillation literature (ConvNet-3): ``depth`` blocks of a 3x3
convolution, instance normalisation (a GroupNorm with one group per channel, affine), ReLU and a 2x2
average pool, then one linear classifier on the flattened feature map.

Small and normalised per image, so a freshly initialised one is a meaningful random embedding for
distribution matching, and training it on a few hundred images takes seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """ConvNet-``depth`` for ``size x size`` 1-channel images; :meth:`embed` gives the flattened
    features the classifier reads."""

    def __init__(self, num_classes: int, *, size: int = 32, width: int = 128, depth: int = 3,
                 in_chans: int = 1) -> None:
        super().__init__()
        if size % (2 ** depth):
            raise ValueError(f"image side {size} is not divisible by 2^depth = {2 ** depth}")
        layers: list[nn.Module] = []
        chans = in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(chans, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            chans = width
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * (size // 2 ** depth) ** 2
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
