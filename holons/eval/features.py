"""Features for evaluation: pooled embeddings and dense maps of a backbone.

Loading a backbone (``load_backbone``) and feeding it (``input_stats``, ``to_input``) live in
``holons.finetune.backbones``, shared with fine-tuning; they are re-exported here for the protocols.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from holons.finetune.backbones import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    RANDOM,
    describe_weights,
    input_stats,
    load_backbone,
    to_input,
)
from holons.runs import progress_enabled, resolve_device
from holons.ssl.backbone import Backbone

__all__ = [
    "RANDOM", "DEFAULT_MEAN", "DEFAULT_STD", "load_backbone", "describe_weights", "input_stats",
    "to_input", "pooled_embeddings", "dense_features", "resolve_device", "progress_enabled",
]

def _batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


@torch.no_grad()
def pooled_embeddings(backbone: Backbone, x: torch.Tensor, *, batch_size: int = 16,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Pooled embeddings ``B x D`` (CPU float32) of normalized inputs ``x`` (``B x 1 x H x W``)."""
    backbone.eval().to(device)
    out = [backbone(b.to(device)).float().cpu() for b in _batches(x, batch_size)]
    return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)


@torch.no_grad()
def dense_features(backbone: Backbone, x: torch.Tensor, *, out_size: int | tuple[int, int] | None = None,
                   stages: int = 1, batch_size: int = 8, device: str | torch.device = "cpu") -> torch.Tensor:
    """Dense feature maps ``B x C x h x w`` (CPU float32), bilinearly upsampled to ``out_size`` if given.

    ``stages=1``: the last stage (``forward_dense``). ``stages=n``: the last ``n`` pyramid stages,
    each L2-normalized over channels (so that every stage weighs the same in a cosine), brought to
    the finest of their grids and concatenated (scaled by 1/sqrt(n), keeping unit norm).
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    backbone.eval().to(device)
    out = []
    for b in _batches(x, batch_size):
        if stages == 1:
            f = backbone.forward_dense(b.to(device)).float()
        else:
            maps = backbone.forward_pyramid(b.to(device), indices=stages)
            grid = maps[0].shape[-2:]
            ups = [F.interpolate(m.float(), size=grid, mode="bilinear", align_corners=False) for m in maps]
            f = torch.cat([F.normalize(u, dim=1) for u in ups], dim=1) / len(maps) ** 0.5
        if out_size is not None:
            f = F.interpolate(f, size=out_size, mode="bilinear", align_corners=False)
        out.append(f.cpu())
    return torch.cat(out)
