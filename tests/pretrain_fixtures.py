"""Tiny phantom images and configs shared by the pretraining tests (trainer, export, DDP).

The images are chest-like (two dark lungs, a bright heart shadow, a spine, noise), 64 px, written
as PNG so that the trainer's ``data.images_dir`` source reads them through the project's readers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_phantoms(root: Path, n: int = 32, size: int = 64, seed: int = 0) -> Path:
    """``n`` PNG chest-like phantoms of ``size`` px under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = 0.25 + 0.3 * yy
        dx, dy, scale = rng.normal(0, 0.03), rng.normal(0, 0.03), 1 + rng.normal(0, 0.05)
        for cx in (0.3, 0.7):
            inside = ((xx - cx - dx) / (0.15 * scale)) ** 2 + ((yy - 0.5 - dy) / (0.3 * scale)) ** 2 < 1
            img = np.where(inside, 0.06, img)
        heart = ((xx - 0.56 - dx) / (0.12 + rng.uniform(0, 0.04))) ** 2 + ((yy - 0.66 - dy) / 0.1) ** 2 < 1
        img = np.where(heart, 0.75, img)
        img = np.where(np.abs(xx - 0.5 - dx) < 0.04, 0.85, img)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"phantom_{i:03d}.png")
    return root


BASE: dict[str, Any] = {
    "model": {"backbone": "convnext_atto", "out_dim": 128, "head_hidden": 64, "head_bottleneck": 32},
    "data": {"batch_size": 8},
    "views": {"global_size": 64, "local_size": 32, "n_local": 2, "local_crops": "both", "n_part_local": 1,
              "cutmix": {"prob": 0.5}},
    "optim": {"lr": 0.02, "warmup_epochs": 0.5, "freeze_last_layer_epochs": 0.5},
    "log_every": 1,
    "checkpoint_every": 100,
}


def tiny_config(images: Path, stages: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """A tiny pretraining config over ``images`` with the given curriculum stages."""
    cfg = copy.deepcopy(BASE)
    cfg["data"]["images_dir"] = str(images)
    cfg["curriculum"] = {"stages": stages}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg
