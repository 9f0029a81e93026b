"""Backbones for evaluation: load foundation weights (or random init) and extract features.

``load_backbone("random", arch)`` builds an untrained timm model; ``load_backbone(DIR)`` loads a
``holons export`` folder (its architecture is read from ``config.json``). The input
normalization is the one recorded in the export, else the pretraining default (mean 0.5,
std 0.25 on [0, 1] intensities).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from holons.errors import ConfigError
from holons.runs import progress_enabled, resolve_device
from holons.ssl.backbone import Backbone, create_backbone

__all__ = [
    "RANDOM", "DEFAULT_MEAN", "DEFAULT_STD", "load_backbone", "describe_weights", "input_stats",
    "to_input", "pooled_embeddings", "dense_features", "resolve_device", "progress_enabled",
]

RANDOM = "random"
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25


def load_backbone(weights: str | Path, arch: str | None = None) -> Backbone:
    """The backbone for ``weights``: an exported folder, or ``"random"`` (then ``arch`` is required).

    With a folder, ``arch`` (when given) must match the architecture recorded in it.
    """
    if str(weights) == RANDOM:
        if not arch:
            raise ConfigError("--weights random needs --arch NAME (a timm model, e.g. convnext_atto)")
        return create_backbone(arch, in_chans=1)
    folder = Path(weights)
    cfg_file = folder / "config.json"
    if not folder.is_dir() or not cfg_file.is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} is not an exported foundation folder (needs model.safetensors and "
                          "config.json), nor 'random'")
    try:
        cfg = json.loads(cfg_file.read_text())
        recorded = str(cfg["architecture"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{cfg_file} records no architecture: {e}") from e
    if arch and arch != recorded:
        raise ConfigError(f"{folder} holds a {recorded!r}, but --arch is {arch!r}")
    in_chans = int(cfg.get("model_args", {}).get("in_chans", 1))
    if in_chans != 1:
        raise ConfigError(f"{folder} holds a {in_chans}-channel model; evaluation feeds 1-channel images")
    return create_backbone(recorded, in_chans=1, pretrained_dir=folder)


def describe_weights(weights: str | Path, backbone: Backbone) -> dict[str, object]:
    """What was evaluated, for results files: weights (folder or "random"), architecture, method and step."""
    out: dict[str, object] = {"weights": str(weights), "arch": backbone.name}
    if str(weights) != RANDOM:
        try:
            prov = json.loads((Path(weights) / "config.json").read_text()).get("holons", {})
        except (OSError, ValueError):
            prov = {}
        out.update({k: prov[k] for k in ("method", "step", "which") if k in prov})
    else:
        out["method"] = RANDOM
    return out


def input_stats(backbone: Backbone) -> tuple[float, float]:
    """(mean, std) to normalize [0, 1] intensities: the exported 1-channel values, else the defaults."""
    return backbone.recorded_input_stats() or (DEFAULT_MEAN, DEFAULT_STD)


def to_input(images: np.ndarray | torch.Tensor, stats: tuple[float, float]) -> torch.Tensor:
    """[0, 1] images (``B x H x W`` or ``B x 1 x H x W``) to the normalized ``B x 1 x H x W`` float tensor."""
    t = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected B x H x W or B x 1 x H x W images, got {tuple(t.shape)}")
    return (t - stats[0]) / stats[1]


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
