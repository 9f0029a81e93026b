"""A fine-tuned radiograph model as a folder, and the run folder it is written in.

``OUT/`` (the run folder is the model folder)::

    model.safetensors   the weights (backbone + head / decoders; plain tensors, no pickles)
    config.json         task, architecture, head, classes or structures, the preprocessing
                        (``Preprocessing.to_dict``), the input normalization, the training config
    metrics.json        validation metrics
    train.log           what the run did

:func:`load_model` rebuilds the model from the folder alone (no foundation folder needed).
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.files import atomic_path, atomic_write, read_model_config
from holons.finetune.backbones import to_input
from holons.finetune.heads import Classifier, Segmenter
from holons.ssl.backbone import create_backbone

__all__ = ["FORMAT", "WEIGHTS_FILE", "CONFIG_FILE", "METRICS_FILE", "LOG_FILE", "RadiographModel",
           "FinetuneResult", "start_run", "save_model", "write_metrics", "load_model", "read_result"]

FORMAT = "holons-radiograph-model/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
TASKS = ("classify", "segment")


@dataclass
class FinetuneResult:
    """What ``finetune_classify`` / ``finetune_segment`` return: the model folder, its validation metrics
    and the resolved config (a dict)."""

    folder: Path
    metrics: dict[str, Any]
    config: dict[str, Any]


@dataclass
class RadiographModel:
    """A loaded model folder: the network (eval mode), its task and what it needs to be fed.

    ``labels``: the structures (segment) or the tasks (classify); ``class_names``: per task
    (classify only); ``meta``: the whole ``config.json``.
    """

    module: nn.Module
    task: str
    preprocessing: Preprocessing
    stats: tuple[float, float]
    labels: list[str]
    class_names: list[list[str]]
    meta: dict[str, Any]

    def inputs(self, canvases: np.ndarray) -> torch.Tensor:
        """Canvases (``B x S x S`` in [0, 1], from ``preprocessing``) as normalized network inputs."""
        return to_input(canvases, self.stats)


def _prepare_run_folder(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """The run layer's folder rules for a model folder (``holons.runs.prepare_run``; fine-tuning keeps no
    checkpoints): ``resume`` on a finished run keeps it (returns True: nothing to do); a model is
    refused unless ``overwrite``; the leftovers of a run that stopped before its model are cleared."""
    from holons.runs import prepare_run

    if resume and overwrite:
        raise HolonsError("choose either --resume or --overwrite, not both")
    if resume and (out / WEIGHTS_FILE).is_file() and (out / METRICS_FILE).is_file():
        return True
    prepare_run(out, overwrite=overwrite, leftovers=(LOG_FILE, CONFIG_FILE, METRICS_FILE),
                results=(WEIGHTS_FILE,), checkpoints=False)
    return False


def start_run(out: str | Path, *, resume: bool, overwrite: bool) -> logging.Logger | None:
    """Prepare ``out`` and return a logger writing to ``out/train.log`` (and stderr at INFO); None when
    ``resume`` finds the run already finished (nothing to do: :func:`read_result` has it)."""
    out = Path(out)
    if _prepare_run_folder(out, resume=resume, overwrite=overwrite):
        return None
    logger = logging.getLogger(f"holons.finetune.{out.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handler = logging.FileHandler(out / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


def close_run(logger: logging.Logger) -> None:
    """Flush and detach the run's log file."""
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def save_model(folder: str | Path, module: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``meta`` plus format and versions) atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if meta.get("task") not in TASKS:
        raise HolonsError(f"model task must be one of {TASKS}, got {meta.get('task')!r}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"format": FORMAT, **meta,
              "versions": {"torch": str(torch.__version__), "python": platform.python_version()}}
    with atomic_write(folder / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
    return folder


def write_metrics(folder: str | Path, metrics: dict[str, Any]) -> None:
    with atomic_write(Path(folder) / METRICS_FILE, "w") as f:
        json.dump(metrics, f, indent=2)


def read_result(folder: str | Path) -> FinetuneResult:
    """The result of a finished run, read back from its folder."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    return FinetuneResult(folder=folder, metrics=json.loads((folder / METRICS_FILE).read_text()),
                          config=meta.get("training", {}))


def _build(meta: dict[str, Any]) -> nn.Module:
    backbone = create_backbone(meta["architecture"], in_chans=1, **meta.get("model_args", {}))
    head = meta["head"]
    if meta["task"] == "segment":
        return Segmenter(backbone, len(meta["structures"]), frozen=False, width=int(head["width"]),
                         image_width=int(head["image_width"]), groups=head["groups"])
    return Classifier(backbone, [len(c) for c in meta["class_names"]], frozen=False)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> RadiographModel:
    """Load a model folder written by ``holons finetune classify | segment``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_model_config(folder, weights=WEIGHTS_FILE, config=CONFIG_FILE, what="a model folder")
    if meta.get("format") != FORMAT:
        raise HolonsError(f"{folder} is not a radiograph model folder (format {meta.get('format')!r}, "
                          f"expected {FORMAT!r}; karyotype models load with `holons karyotype predict`)")
    module = _build(meta)
    module.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    norm = meta["normalization"]
    labels = meta["structures"] if meta["task"] == "segment" else meta["tasks"]
    return RadiographModel(module=module.to(device).eval(), task=meta["task"],
                           preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
                           stats=(float(norm["mean"]), float(norm["std"])), labels=list(labels),
                           class_names=[list(c) for c in meta.get("class_names", [])], meta=meta)
