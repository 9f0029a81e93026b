"""Task heads over a backbone: the ``Classifier`` (pooled embedding -> one linear head for all tasks)
and the ``Segmenter`` (feature pyramid -> U-Net-style decoder(s) with full-resolution image skips).

Structures are independent sigmoid channels (clavicles overlap the lungs). Small structures get a fair
chance at CPU scale (few steps, 64-128 px): the decoder reaches full resolution with the input image as
its skip, and structures of one group (left and right lungs, left and right clavicles) share a decoder
while every other structure has its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from holons.data.annotated import STRUCTURES
from holons.errors import HolonsError
from holons.ssl.backbone import Backbone

__all__ = ["STRUCTURE_GROUPS", "UNetDecoder", "Segmenter", "Classifier", "structure_groups", "optimizer_step"]

STRUCTURE_GROUPS = {"lungs": ("right_lung", "left_lung"), "clavicles": ("right_clavicle", "left_clavicle")}


def _block(cin: int, cout: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers += [nn.Conv2d(c, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNetDecoder(nn.Module):
    """U-Net-style decoder over a backbone pyramid, with logits at the input's full resolution.

    From the deepest map: upsample, concatenate the next shallower map, convolve. Backbone pyramids
    start at stride 4 (ConvNeXt) or coarser (ViT), too coarse for thin structures such as the
    clavicles (a few pixels wide at 128 px), so with ``image_width > 0`` the decoder goes on
    upsampling by 2 down to stride 1 (``first_stride``: the stride of the shallowest map), and at
    each of these extra scales a small convolution block on the input image, average-pooled to that
    scale, is the skip (as the input block of MONAI's UNETR). Those stages have ``image_width``
    channels. ``image_width=0`` decodes from the backbone's features alone and upsamples the last map
    to the input size.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 16,
                 image_width: int = 16, first_stride: int = 4) -> None:
        super().__init__()
        chans = list(in_channels)
        self.bottom = _block(chans[-1], width)
        self.ups = nn.ModuleList(_block(width + c, width) for c in reversed(chans[:-1]))
        n_extra = round(math.log2(first_stride)) if image_width > 0 and first_stride > 1 else 0
        self.image_blocks = nn.ModuleList(_block(1, image_width) for _ in range(n_extra))
        self.refine = nn.ModuleList(_block((width if i == 0 else image_width) + image_width, image_width)
                                    for i in range(n_extra))
        self.final = _block(width, width) if n_extra == 0 else nn.Identity()
        self.head = nn.Conv2d(image_width if n_extra else width, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_size: tuple[int, int],
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at ``out_size``; ``image`` (``B x 1 x H x W`` at ``out_size``) feeds the image skips."""
        x = self.bottom(feats[-1])
        for block, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        if not self.refine:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
            return self.head(self.final(x))
        if image is None or tuple(image.shape[-2:]) != tuple(out_size):
            raise ValueError(f"this decoder needs the input image at {tuple(out_size)} as a skip")
        n = len(self.refine)
        for i, (image_block, block) in enumerate(zip(self.image_blocks, self.refine, strict=True)):
            factor = 2 ** (n - 1 - i)
            size = (out_size[0] // factor, out_size[1] // factor)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            img = F.adaptive_avg_pool2d(image, size) if factor > 1 else image
            x = block(torch.cat([x, image_block(img)], dim=1))
        return self.head(x)


def _first_stride(backbone: Backbone) -> int:
    """Stride of the shallowest ``forward_pyramid`` map (timm's feature_info ``reduction``, else 4)."""
    info = getattr(backbone.model, "feature_info", None)
    try:
        return int(info[0]["reduction"]) if info else 4
    except (KeyError, TypeError, IndexError, ValueError):
        return 4


def structure_groups(structures: Sequence[str] = STRUCTURES) -> list[list[int]]:
    """Channel indices of ``structures`` that share a decoder: each of ``STRUCTURE_GROUPS`` (left and
    right told apart jointly), every other structure alone."""
    groups, placed = [], set()
    for s in structures:
        if s in placed:
            continue
        members = next((m for m in STRUCTURE_GROUPS.values() if s in m), (s,))
        group = [structures.index(m) for m in members if m in structures]
        placed.update(structures[k] for k in group)
        groups.append(group)
    return groups


class _EncoderHead(nn.Module):
    """A backbone and a head; with ``frozen`` the backbone runs without gradients and stays in eval mode."""

    def __init__(self, backbone: Backbone, *, frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.frozen = frozen
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> _EncoderHead:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def _encoder_grad(self) -> torch.set_grad_enabled:
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen)


class Segmenter(_EncoderHead):
    """Backbone pyramid + U-Net decoder(s); with ``frozen`` the encoder runs without gradients in eval mode.

    ``groups`` partitions the output channels; each part gets its own decoder (None: one decoder for
    all). With one shared decoder the large structures (lungs, heart) shape its features within a few
    steps and small ones (clavicles) are left without capacity; separate decoders per group remove
    that competition.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, frozen: bool, width: int = 16,
                 image_width: int = 16, groups: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(backbone, frozen=frozen)
        parts = [list(range(num_classes))] if groups is None else [list(map(int, g)) for g in groups]
        if sorted(k for g in parts for k in g) != list(range(num_classes)) or not all(parts):
            raise HolonsError(f"groups must partition the {num_classes} output channels, got {groups}")
        self.groups = parts
        stride = _first_stride(backbone)
        self.decoders = nn.ModuleList(
            UNetDecoder(backbone.feature_channels(), len(g), width, image_width, first_stride=stride)
            for g in parts)
        self.register_buffer("order", torch.argsort(torch.tensor([k for g in parts for k in g])),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._encoder_grad():
            feats = self.backbone.forward_pyramid(x)
        logits = torch.cat([d(feats, x.shape[-2:], x) for d in self.decoders], dim=1)
        return logits.index_select(1, self.order)


class Classifier(_EncoderHead):
    """Backbone + one linear layer whose outputs are the tasks' class logits side by side
    (``num_classes[t]`` for task ``t``); with ``frozen`` the encoder runs without gradients in eval mode."""

    def __init__(self, backbone: Backbone, num_classes: Sequence[int], *, frozen: bool) -> None:
        super().__init__(backbone, frozen=frozen)
        self.num_classes = [int(c) for c in num_classes]
        self.head = nn.Linear(backbone.embed_dim, int(sum(self.num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._encoder_grad():
            feats = self.backbone(x)
        return self.head(feats)

    def task_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """The logits split per task."""
        return list(torch.split(logits, self.num_classes, dim=1))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, steps: int, *,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                   log: Callable[[str], None] | None = None) -> None:
    """One step of a head's training loop: backward, step (and the schedule), the loss logged every
    tenth of ``steps``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if scheduler is not None:
        scheduler.step()
    if log is not None and (step + 1) % max(1, steps // 10) == 0:
        log(f"step {step + 1}/{steps} loss {loss.item():.4f}")
