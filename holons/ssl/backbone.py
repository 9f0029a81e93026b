"""Backbone factory: any timm model as a 1-channel feature extractor.

Training uses the pooled embedding (``forward``); evaluation of correspondence and dense
transfer uses the last-stage feature map (``forward_dense``) or the multi-scale maps
(``forward_pyramid``). All three run on the same weights, so whatever is learned by the
pooled objective is what the dense evaluations see.

Nothing is ever downloaded: models are built with random weights, or from a folder that
``holons export`` wrote (``model.safetensors`` + ``config.json``) through timm's
``local-dir:`` source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from holons.errors import ConfigError

__all__ = ["Backbone", "create_backbone", "feature_grid"]


class Backbone(nn.Module):
    """A timm model created with ``num_classes=0``, seen as an embedding network.

    The wrapped model is ``self.model`` (its ``state_dict`` is what gets exported, so the keys
    are timm's own). ``embed_dim`` is the size of the pooled embedding.
    """

    def __init__(self, model: nn.Module, name: str, in_chans: int = 1) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.in_chans = in_chans
        # Pooled embedding size: models with a pre-logits head (MobileNetV3, EfficientNet-style)
        # report it as head_hidden_size; num_features is the last stage's width.
        self.embed_dim: int = int(getattr(model, "head_hidden_size", None) or model.num_features)

    @property
    def pretrained_cfg(self) -> dict:
        """timm's pretrained config of the wrapped model (mean, std, input size...)."""
        return dict(getattr(self.model, "pretrained_cfg", {}))

    def recorded_input_stats(self) -> tuple[float, float] | None:
        """(mean, std) of the 1-channel inputs the weights were trained on, as recorded in the export's
        ``config.json``; None when nothing usable is recorded (random init, timm's 3-channel defaults)."""
        cfg = self.pretrained_cfg
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and std is not None and len(mean) == 1 and len(std) == 1 and float(std[0]) > 0:
            return float(mean[0]), float(std[0])
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding, ``B x D`` (the model's own global pooling and pre-logits norm)."""
        return self.model(x)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map, ``B x C x h x w`` (for ViTs: the final-norm patch tokens as a grid)."""
        if hasattr(self.model, "forward_intermediates"):
            return self.model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
        feats = self.model.forward_features(x)
        if feats.ndim != 4:
            raise ConfigError(
                f"backbone {self.name!r} gives no spatial feature map (forward_features shape "
                f"{tuple(feats.shape)}); choose a model with forward_intermediates support"
            )
        return feats

    def forward_pooled_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled embedding (as ``forward``) and the last-stage map ``B x C x h x w`` of one pass
        (for ViTs: the final-norm patch tokens as a square grid, prefix tokens dropped)."""
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats)
        if feats.ndim == 4:
            return pooled, feats
        if feats.ndim == 3:
            tokens = feats[:, int(getattr(self.model, "num_prefix_tokens", 0)):]
            side = math.isqrt(tokens.shape[1])
            if side * side == tokens.shape[1]:
                return pooled, tokens.transpose(1, 2).unflatten(2, (side, side))
        raise ConfigError(f"backbone {self.name!r} gives no square feature map (forward_features shape "
                          f"{tuple(feats.shape)})")

    @property
    def dense_channels(self) -> int:
        """Channels of the last-stage map of ``forward_dense`` / ``forward_pooled_dense``."""
        return int(self.model.num_features)

    def forward_pyramid(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Feature maps of every stage (or of the stages in ``indices``), shallow to deep, ``B x C x h x w``.

        ``indices`` follows timm: an int ``n`` takes the last ``n`` stages, a sequence picks stages.
        For plain ViTs every block is one "stage" and all maps share the patch grid.
        """
        if not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(
                f"backbone {self.name!r} does not support multi-scale features in this timm version"
            )
        return list(self.model.forward_intermediates(x, indices=indices, intermediates_only=True))

    def feature_channels(self) -> list[int]:
        """Channel count of each stage of ``forward_pyramid`` (from timm's feature_info)."""
        info = getattr(self.model, "feature_info", None)
        if not info:
            return [self.embed_dim]
        return [int(f["num_chs"]) for f in info]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory on large models (passes through to timm)."""
        self.model.set_grad_checkpointing(enable)


def feature_grid(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """Feature maps ``B x C x h x w`` resampled to ``B x C x grid x grid``: averaged over the cells of a
    coarser grid, bilinearly interpolated to a finer one."""
    if maps.shape[-2:] == (grid, grid):
        return maps
    if grid <= min(maps.shape[-2:]):
        return F.adaptive_avg_pool2d(maps, grid)
    return F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)


def _exported_architecture(pretrained_dir: Path) -> str:
    cfg_file = pretrained_dir / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(
            f"pretrained_dir {pretrained_dir} has no config.json (expected a `holons export` folder)"
        )
    if not (pretrained_dir / "model.safetensors").is_file():
        raise ConfigError(f"pretrained_dir {pretrained_dir} has no model.safetensors")
    try:
        return str(json.loads(cfg_file.read_text())["architecture"])
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{cfg_file} is not a timm model config: {exc}") from exc


def create_backbone(
    name: str, *, in_chans: int = 1, pretrained_dir: str | Path | None = None, **kwargs
) -> Backbone:
    """Build a timm backbone with ``in_chans`` input channels and no classifier.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size=64`` for ViTs, ``drop_path_rate``;
    ViTs trained with multi-crop need ``dynamic_img_size=True``). With ``pretrained_dir`` the
    weights come from an exported folder; its architecture must be ``name``.
    """
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    if pretrained_dir is None:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    else:
        folder = Path(pretrained_dir)
        arch = _exported_architecture(folder)
        if arch != name:
            raise ConfigError(f"pretrained_dir {folder} holds a {arch!r}, but the backbone is {name!r}")
        model = timm.create_model(
            f"local-dir:{folder}", pretrained=True, num_classes=0, in_chans=in_chans, **kwargs
        )
    return Backbone(model, name, in_chans)
