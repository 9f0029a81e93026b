"""Training a weakly supervised localizer: ``train_localizer(config, data=..., out=...)``.

The config (:class:`LocalizeConfig`: a dataclass, a YAML path, a dict or None, then ``key=value``
overrides) names the method and its options, where the backbone starts (``init``: an exported
foundation folder, a timm model name, or ``random`` with ``arch``), the image size, steps, learning
rate and seed. Images of the set's ``train`` split (all images where the set has no splits) are read
through :class:`holons.data.preprocess.Preprocessing` (the foundation's VOI policy where there is
one) and batches are drawn class-balanced, seeded by (seed, step), so a resumed run draws what an
uninterrupted one would. Only image-level labels are used; boxes are never read here.

``OUT`` is the run folder and the model folder: ``model.safetensors``, ``config.json``
(``holons.finetune.localize.folder``), ``metrics.json`` and ``train.log``; ``checkpoints/`` holds the
resumable state until the model is written.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from holons.config import resolve_config, to_dict
from holons.data.preprocess import Preprocessing
from holons.data.weak_labels import WeakLabelSet, load_weak_label_set
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.localize import build_localizer
from holons.finetune.localize.base import Localizer
from holons.finetune.localize.folder import CONFIG_FILE, WEIGHTS_FILE, save_localizer
from holons.runs import (
    CHECKPOINTS,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prepare_run,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
)
from holons.ssl.backbone import Backbone, create_backbone
from holons.ssl.optim import param_groups, set_lr
from holons.ssl.schedules import cosine_schedule

__all__ = ["LocalizeConfig", "LocalizeRun", "train_localizer", "read_images"]

METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"


@dataclass
class LocalizeConfig:
    """Everything a localizer's training run depends on (module docstring)."""

    method: str = "cam"
    init: str = "random"
    arch: str = "resnet18"
    finding: str | None = None
    image_size: int = 128
    resize: str = "letterbox"
    feature_stage: int = -1
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    balanced: bool = True
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalizeRun:
    """What a run left: the model folder (= run folder), held-out metrics, the resolved config."""

    out: Path
    metrics: dict[str, Any]
    config: dict[str, Any]


def _start_backbone(cfg: LocalizeConfig) -> tuple[Backbone, str, dict[str, Any], str]:
    """(backbone, architecture, its timm arguments, the VOI policy its images were read with)."""
    import timm

    from holons.ssl.export import foundation_preprocessing, load_foundation

    if cfg.init == "random":
        return create_backbone(cfg.arch, in_chans=1), cfg.arch, {}, "window"
    folder = Path(cfg.init)
    if folder.is_dir():
        backbone = load_foundation(folder)
        args = json.loads((folder / "config.json").read_text()).get("model_args", {})
        args = {k: v for k, v in args.items() if k != "in_chans"}
        return backbone, backbone.name, args, foundation_preprocessing(folder).voi
    if timm.is_model(cfg.init):
        return create_backbone(cfg.init, in_chans=1), cfg.init, {}, "window"
    raise HolonsError(f"init {cfg.init!r} is neither 'random', an exported foundation folder, "
                      "nor a timm model")


def read_images(paths: list[Path], preprocessing: Preprocessing, *, progress: bool = False,
                log=None) -> tuple[np.ndarray, np.ndarray]:
    """Canvases ``N x S x S`` of the readable images and the positions of those that were read."""
    canvases, kept = [], []
    for i, path in enumerate(tqdm(paths, desc="read images", disable=not progress)):
        try:
            canvases.append(preprocessing.read(path)[0])
        except (HolonsError, OSError, ValueError) as e:
            if log is not None:
                log(f"skipped unreadable {path.name}: {type(e).__name__}")
            continue
        kept.append(i)
    size = preprocessing.size
    return (np.stack(canvases) if canvases else np.zeros((0, size, size), np.float32)), np.asarray(kept, int)


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """The run layer's folder rules (``holons.runs.prepare_run``); True when ``resume`` finds the
    finished model already there (nothing to do)."""
    if resume and (out / WEIGHTS_FILE).is_file() and (out / METRICS_FILE).is_file():
        return True
    prepare_run(out, resume=resume, overwrite=overwrite, leftovers=(CONFIG_FILE, METRICS_FILE),
                results=(WEIGHTS_FILE,))
    return False


def _optimizer(model: Localizer, cfg: LocalizeConfig) -> torch.optim.Optimizer:
    backbone = {id(p) for p in model.backbone.parameters()}
    groups = [{**g, "lr_scale": cfg.backbone_lr_scale}
              for g in param_groups(model.backbone, cfg.weight_decay)]
    for g in param_groups(model, cfg.weight_decay):
        rest = [p for p in g["params"] if id(p) not in backbone]
        if rest:
            groups.append({**g, "params": rest})
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _batch(labels: np.ndarray, size: int, seed: int, step: int, balanced: bool) -> np.ndarray:
    """The step's batch: class-balanced draws without replacement, seeded by (seed, step)."""
    rng = np.random.default_rng([seed, step])
    weights = 1.0 / np.bincount(labels)[labels] if balanced else np.ones(len(labels))
    return rng.choice(len(labels), size=min(size, len(labels)), replace=False, p=weights / weights.sum())


@torch.no_grad()
def _held_out_accuracy(model: Localizer, canvases: np.ndarray, labels: np.ndarray, device: torch.device,
                       batch_size: int) -> float:
    model.eval()
    batches = (torch.from_numpy(canvases[i:i + batch_size])[:, None].to(device)
               for i in range(0, len(canvases), batch_size))
    predicted = [model.logits(x).argmax(1).cpu() for x in batches]
    return float((torch.cat(predicted).numpy() == labels).mean())


def train_localizer(config: LocalizeConfig | str | Path | dict | None = None, *, data: str | Path,
                    out: str | Path, overrides: list[str] | dict | None = None, resume: bool = False,
                    overwrite: bool = False, progress: bool | None = None) -> LocalizeRun:
    """Train ``config.method`` on the labelled images at ``data`` (phantoms, JSRT or a manifest, see
    ``holons.data.weak_labels``) and write the model folder ``out``."""
    cfg = resolve_config(LocalizeConfig, config, overrides)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise HolonsError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    out = Path(out)
    if _prepare_out(out, resume=resume, overwrite=overwrite):
        return LocalizeRun(out, json.loads((out / METRICS_FILE).read_text()), to_dict(cfg))
    show = sys.stderr.isatty() if progress is None else bool(progress)

    def log(line: str) -> None:
        with open(out / LOG_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    dataset: WeakLabelSet = load_weak_label_set(data, cfg.finding)
    train_idx = dataset.indices("train") if np.any(dataset.split == "train") else dataset.indices("all")
    if len(np.unique(dataset.labels[train_idx])) < 2:
        raise HolonsError(f"{data}: the training images need at least two classes")
    torch.manual_seed(cfg.seed)
    backbone, arch, backbone_args, voi = _start_backbone(cfg)
    preprocessing = Preprocessing(size=cfg.image_size, resize=cfg.resize, voi=voi)
    model = build_localizer(cfg.method, backbone, len(dataset.classes), feature_stage=cfg.feature_stage,
                            options=cfg.options)
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = _optimizer(model, cfg)
    lrs = cosine_schedule(cfg.lr, cfg.lr * 0.01, cfg.steps, warmup_steps=min(cfg.steps // 10, 50))
    start = 0
    found = latest_checkpoint(out / CHECKPOINTS) if resume else None
    if found is not None:
        state = load_checkpoint(found, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
        log(f"resumed from {found.name} at step {start}")
    else:
        log(f"start {cfg.method} from {cfg.init} ({arch}) on {data}: {len(train_idx)} training images")

    canvases, kept = read_images([dataset.paths[i] for i in train_idx], preprocessing, progress=show, log=log)
    labels = dataset.labels[train_idx][kept]
    model.train()
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.method}", disable=not show, initial=start,
               total=cfg.steps)
    terms: dict[str, float] = {}
    for step in bar:
        idx = _batch(labels, cfg.batch_size, cfg.seed, step, cfg.balanced)
        images = torch.from_numpy(canvases[idx])[:, None].to(device)
        set_lr(optimizer, float(lrs[step]))
        targets = torch.from_numpy(labels[idx]).long().to(device)
        loss, terms = model.loss(images, targets, progress=step / cfg.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % max(cfg.steps // 10, 1) == 0 or done == cfg.steps:
            log(f"step {done}/{cfg.steps} " + " ".join(f"{k} {v:.4f}" for k, v in terms.items()))
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                             "rng": capture_rng_state()}, out / CHECKPOINTS, done, keep_last=1)

    metrics: dict[str, Any] = {"method": cfg.method, "steps": cfg.steps, "train_images": int(len(labels)),
                               "final_terms": terms}
    held = dataset.held_out_split()
    if held != "all":
        held_idx = dataset.indices(held)
        held_canvases, held_kept = read_images([dataset.paths[i] for i in held_idx], preprocessing, log=log)
        metrics[f"{held}_accuracy"] = _held_out_accuracy(
            model, held_canvases, dataset.labels[held_idx][held_kept], device, cfg.batch_size)
    model.eval()
    save_localizer(model, out, method=cfg.method, architecture=arch, backbone_args=backbone_args,
                   classes=dataset.classes, preprocessing=preprocessing, config=to_dict(cfg))
    with atomic_write(out / METRICS_FILE, "w") as f:
        json.dump(metrics, f, indent=2)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    accuracy = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("accuracy"))
    log(f"wrote the model folder; {accuracy}")
    return LocalizeRun(out, metrics, to_dict(cfg))
