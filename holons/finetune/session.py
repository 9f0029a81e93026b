"""The steps ``finetune_classify`` and ``finetune_segment`` share: config, run folder and log, the
starting backbone with its preprocessing and normalization, and writing the model folder at the end."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from holons.config import resolve_config, to_dict
from holons.data.preprocess import Preprocessing
from holons.finetune.backbones import (
    default_preprocessing,
    input_stats,
    is_foundation,
    load_backbone,
)
from holons.finetune.config import FinetuneConfig
from holons.finetune.model_folder import (
    FinetuneResult,
    close_run,
    read_result,
    save_model,
    start_run,
    write_metrics,
)
from holons.runs import progress_enabled, resolve_device
from holons.ssl.backbone import Backbone

__all__ = ["Session", "begin", "finish"]

C = TypeVar("C", bound=FinetuneConfig)


@dataclass
class Session:
    """A run in progress: resolved config, its log, the backbone to start from and how to feed it."""

    config: FinetuneConfig
    out: Path
    logger: logging.Logger
    backbone: Backbone
    preprocessing: Preprocessing
    stats: tuple[float, float]
    device: torch.device
    show: bool
    started: float = field(default_factory=time.perf_counter)

    def log(self, line: str) -> None:
        self.logger.info(line)


def _model_args(init: str) -> dict[str, Any]:
    """Architecture arguments recorded in a foundation folder (e.g. a ViT's ``img_size``), for rebuilding."""
    if not is_foundation(init):
        return {}
    args = json.loads((Path(init) / "config.json").read_text()).get("model_args", {})
    return {k: v for k, v in args.items() if k != "in_chans"}


def begin(cls: type[C], config: C | str | Path | dict | None, overrides: list[str] | dict | None,
          out: str | Path, *, resume: bool, overwrite: bool,
          progress: bool | None = None) -> Session | FinetuneResult:
    """Resolve the config, prepare ``out``, build the starting backbone. A finished run met with
    ``resume`` comes back as its :class:`FinetuneResult` instead (nothing is trained again)."""
    cfg = resolve_config(cls, config, overrides)
    out = Path(out)
    logger = start_run(out, resume=resume, overwrite=overwrite)
    if logger is None:
        return read_result(out)
    torch.manual_seed(cfg.seed)  # a random init is seeded too
    backbone = load_backbone(cfg.init, cfg.arch)
    preprocessing = (Preprocessing.from_dict(cfg.preprocessing) if cfg.preprocessing is not None
                     else default_preprocessing(cfg.init, cfg.size))
    session = Session(config=cfg, out=out, logger=logger, backbone=backbone, preprocessing=preprocessing,
                      stats=input_stats(backbone), device=resolve_device(cfg.device),
                      show=progress_enabled(progress))
    session.log(f"init {cfg.init} ({backbone.name}), mode {cfg.mode}, "
                f"preprocessing {preprocessing.to_dict()}, device {session.device}")
    return session


def finish(session: Session, module: nn.Module, head: dict[str, Any], labels: dict[str, Any],
           metrics: dict[str, Any]) -> FinetuneResult:
    """Write ``model.safetensors`` + ``config.json`` and ``metrics.json``; close the log."""
    cfg = to_dict(session.config)
    meta = {"task": labels.pop("task"), "architecture": session.backbone.name,
            "model_args": _model_args(session.config.init), "head": head, **labels,
            "preprocessing": session.preprocessing.to_dict(),
            "normalization": {"mean": session.stats[0], "std": session.stats[1]},
            "init": str(session.config.init), "training": cfg}
    save_model(session.out, module, meta)
    metrics = {**metrics, "elapsed_s": round(time.perf_counter() - session.started, 2)}
    write_metrics(session.out, metrics)
    session.log(f"model written to {session.out}; metrics {json.dumps(metrics)}")
    close_run(session.logger)
    return FinetuneResult(folder=session.out, metrics=metrics, config=cfg)
