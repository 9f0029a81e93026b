"""A trained localizer as a folder: ``model.safetensors`` + ``config.json``.

``config.json`` records what rebuilds the module without the foundation folder it started from:
the method and its options, the backbone architecture and its timm arguments, the feature stage,
the classes, the input normalization and the preprocessing (``Preprocessing.to_dict``), plus the
training config for provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.files import atomic_path, atomic_write, read_model_config
from holons.finetune.localize import build_localizer
from holons.finetune.localize.base import Localizer
from holons.ssl.backbone import create_backbone

__all__ = ["FORMAT", "WEIGHTS_FILE", "CONFIG_FILE", "LocalizerModel", "save_localizer", "load_localizer"]

FORMAT = "holons-localizer/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class LocalizerModel:
    """A loaded folder: the module (eval mode), its classes, how to prepare images, the whole config."""

    module: Localizer
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict[str, Any]


def save_localizer(module: Localizer, folder: str | Path, *, method: str, architecture: str,
                   backbone_args: dict[str, Any], classes: list[str], preprocessing: Preprocessing,
                   config: dict[str, Any]) -> Path:
    """Write the weights and ``config.json`` into ``folder`` (atomically, each)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp),
                  metadata={"format": "pt"})
    meta = {"format": FORMAT, "task": "localize", "method": method, "architecture": architecture,
            "backbone_args": backbone_args, "feature_stage": module.feature_stage,
            "options": module.describe(),
            "classes": list(classes), "input_stats": [float(v) for v in module.input_stats.tolist()],
            "preprocessing": preprocessing.to_dict(), "config": config, "torch": str(torch.__version__)}
    with atomic_write(folder / CONFIG_FILE, "w") as f:
        json.dump(meta, f, indent=2)
    return folder


def load_localizer(folder: str | Path, device: str | torch.device = "cpu") -> LocalizerModel:
    """Rebuild a folder written by :func:`save_localizer`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_model_config(folder, weights=WEIGHTS_FILE, config=CONFIG_FILE,
                             what="a localizer model folder")
    if meta.get("format") != FORMAT:
        raise HolonsError(f"{folder / CONFIG_FILE} is not a localizer model (format {meta.get('format')!r}, "
                          f"expected {FORMAT})")
    backbone = create_backbone(meta["architecture"], in_chans=1, **meta["backbone_args"])
    module = build_localizer(meta["method"], backbone, len(meta["classes"]),
                             feature_stage=meta["feature_stage"], input_stats=tuple(meta["input_stats"]),
                             options=meta["options"])
    module.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return LocalizerModel(module.to(device).eval(), list(meta["classes"]),
                          Preprocessing.from_dict(meta["preprocessing"]), meta)
