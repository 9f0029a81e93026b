"""Where a fine-tuned (or evaluated) backbone starts, and how images are fed to it.

``load_backbone(init, arch)``: ``init`` is a ``holons export`` folder (its architecture is read from
``config.json``), ``"random"`` (then ``arch`` names the timm model), or a timm model name (random
weights too: nothing is ever downloaded). The input normalization is the one recorded in the export,
else the pretraining default (mean 0.5, std 0.25 on [0, 1] intensities).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from holons.data.preprocess import Preprocessing
from holons.errors import ConfigError
from holons.ssl.backbone import Backbone, create_backbone

__all__ = [
    "RANDOM", "DEFAULT_MEAN", "DEFAULT_STD", "is_foundation", "load_backbone", "default_preprocessing",
    "describe_weights", "input_stats", "to_input",
]

RANDOM = "random"
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25


def is_foundation(init: str | Path) -> bool:
    """Whether ``init`` names a folder (an exported foundation, or something meant to be one)."""
    return str(init) != RANDOM and (Path(init).is_dir() or "/" in str(init) or str(init).startswith("."))


def load_backbone(init: str | Path, arch: str | None = None) -> Backbone:
    """The backbone for ``init``: an exported folder, ``"random"`` (then ``arch`` is required) or a timm
    model name (random weights). With a folder, ``arch`` (when given) must match the one recorded in it."""
    if str(init) == RANDOM:
        if not arch:
            raise ConfigError("--weights random needs --arch NAME (a timm model, e.g. convnext_atto)")
        return create_backbone(arch, in_chans=1)
    if not is_foundation(init):
        if arch and arch != str(init):
            raise ConfigError(f"init is the timm model {init!r}, but arch is {arch!r}")
        return create_backbone(str(init), in_chans=1)
    folder = Path(init)
    cfg_file = folder / "config.json"
    if not folder.is_dir() or not cfg_file.is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} is not an exported foundation folder (needs model.safetensors and "
                          "config.json), nor 'random', nor a timm model name")
    try:
        cfg = json.loads(cfg_file.read_text())
        recorded = str(cfg["architecture"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{cfg_file} records no architecture: {e}") from e
    if arch and arch != recorded:
        raise ConfigError(f"{folder} holds a {recorded!r}, but --arch is {arch!r}")
    in_chans = int(cfg.get("model_args", {}).get("in_chans", 1))
    if in_chans != 1:
        raise ConfigError(f"{folder} holds a {in_chans}-channel model; radiographs are 1-channel images")
    return create_backbone(recorded, in_chans=1, pretrained_dir=folder)


def default_preprocessing(init: str | Path, size: int | None = None) -> Preprocessing:
    """The foundation's preprocessing (at ``size`` when given), else the contract's default at ``size``."""
    from dataclasses import replace

    from holons.ssl.export import foundation_preprocessing

    if is_foundation(init):
        recorded = foundation_preprocessing(init)
        return recorded if size is None else replace(recorded, size=int(size))
    return Preprocessing() if size is None else Preprocessing(size=int(size))


def describe_weights(weights: str | Path, backbone: Backbone) -> dict[str, object]:
    """What was evaluated, for results files: weights (folder or "random"), architecture, method and step."""
    out: dict[str, object] = {"weights": str(weights), "arch": backbone.name}
    if is_foundation(weights):
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
