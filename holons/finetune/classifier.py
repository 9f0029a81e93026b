"""``holons finetune classify``: a classifier for whatever classes (or findings) the data labels.

``finetune_classify(config, data=..., out=...)`` reads the images through the preprocessing contract
(``holons.data.preprocess``), trains a :class:`~holons.finetune.heads.Classifier` (one linear head for
all tasks on the pooled embedding; full fine-tuning or a frozen encoder; all training images, a label
fraction, or ``shots`` of them, every class kept) and writes a model folder with validation metrics.

Single-label data (a ``label`` column) is one task with its classes; multi-label data (0/1 columns)
is one binary task per finding. The loss is the cross-entropy summed over tasks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from holons.data.labelled import label_subset, load_classification_set
from holons.errors import HolonsError
from holons.finetune.backbones import to_input
from holons.finetune.config import ClassifyConfig
from holons.finetune.heads import Classifier, optimizer_step
from holons.finetune.inputs import log_and_print, read_canvases, train_val_indices
from holons.finetune.metrics import accuracy, auc
from holons.finetune.model_folder import FinetuneResult
from holons.finetune.session import begin, finish
from holons.ssl.backbone import Backbone

__all__ = ["MODES", "train_classifier", "class_probabilities", "finetune_classify"]

MODES = ("finetune", "frozen")


def train_classifier(backbone: Backbone, images: torch.Tensor, labels: np.ndarray,
                     num_classes: Sequence[int], *,
                     mode: str = "finetune", steps: int = 100, batch_size: int = 16, lr: float = 1e-3,
                     encoder_lr: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False, log: Callable[[str], None] | None = None) -> Classifier:
    """Train a :class:`Classifier` on a copy of ``backbone`` (normalized ``images`` ``N x 1 x S x S``,
    ``labels`` ``N x T`` class indices, ``num_classes`` per task); AdamW at constant ``lr`` (head) and
    ``encoder_lr`` (``finetune`` mode only)."""
    if mode not in MODES:
        raise HolonsError(f"mode must be one of {MODES}, got {mode!r}")
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(backbone), num_classes, frozen=mode == "frozen").to(device)
    groups = [{"params": model.head.parameters(), "lr": lr}]
    if mode == "finetune":
        groups.append({"params": model.backbone.parameters(), "lr": encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in tqdm(range(steps), desc="classify steps", disable=not progress):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
        per_task = model.task_logits(model(images[idx].to(device)))
        loss = sum(F.cross_entropy(logits, y[idx, t].to(device)) for t, logits in enumerate(per_task))
        optimizer_step(opt, loss, step, steps, log=log)
    return model.eval()


@torch.no_grad()
def class_probabilities(model: Classifier, images: torch.Tensor, *, batch_size: int = 16,
                        device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Per task, class probabilities ``N x C`` (float64) of normalized ``images``."""
    model.eval()
    logits = torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, len(images), batch_size)])
    return [t.softmax(dim=1).numpy().astype(np.float64) for t in model.task_logits(logits)]


def _validation_metrics(labels: np.ndarray, probabilities: list[np.ndarray], tasks: list[str]) -> dict:
    out = {}
    for t, task in enumerate(tasks):
        scores = probabilities[t]
        out[task] = {"accuracy": accuracy(labels[:, t], scores.argmax(axis=1)),
                     "auc": auc(labels[:, t], scores) if len(np.unique(labels[:, t])) > 1 else None}
    return out


def finetune_classify(config: ClassifyConfig | str | Path | dict | None = None, *, data: str | Path,
                      out: str | Path, overrides: list[str] | dict | None = None, resume: bool = False,
                      overwrite: bool = False, progress: bool | None = None) -> FinetuneResult:
    """Fine-tune a classifier on ``data`` (a manifest CSV, the phantoms or the covid set;
    ``holons.data.labelled``) and write the model folder ``out``.

    ``config``: a :class:`ClassifyConfig`, a YAML path, a dict or None (defaults); ``overrides``:
    ``["key=value"]``. ``resume`` returns a finished run as it is; ``overwrite`` replaces it.
    """
    session = begin(ClassifyConfig, config, overrides, out, resume=resume, overwrite=overwrite,
                    progress=progress)
    if isinstance(session, FinetuneResult):
        return session
    cfg: ClassifyConfig = session.config
    dataset = load_classification_set(data, seed=cfg.seed)
    canvases, geometries = read_canvases(dataset.paths, session.preprocessing, show=session.show,
                                         report=log_and_print(session.logger))
    readable = np.asarray([g is not None for g in geometries])
    train, val = train_val_indices(dataset.split, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train, val = train[readable[train]], val[readable[val]]
    if len(train) == 0:
        raise HolonsError(f"{data}: no readable training images")
    train = train[label_subset(dataset.labels[train], cfg.label_fraction, cfg.seed, count=cfg.shots)]
    n_classes = [len(c) for c in dataset.class_names]
    session.log(f"tasks {dataset.tasks} with classes {dataset.class_names}; {len(train)} training and "
                f"{len(val)} validation images")
    x = to_input(canvases, session.stats)
    model = train_classifier(session.backbone, x[train], dataset.labels[train], n_classes, mode=cfg.mode,
                             steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, encoder_lr=cfg.encoder_lr,
                             seed=cfg.seed, device=session.device, progress=session.show, log=session.log)
    metrics: dict = {"task": "classify", "tasks": dataset.tasks, "single_label": dataset.single_label,
                     "n_train": int(len(train)), "n_val": int(len(val)), "mode": cfg.mode, "steps": cfg.steps,
                     "unreadable": int((~readable).sum())}
    if len(val):
        probs = class_probabilities(model, x[val], batch_size=cfg.batch_size, device=session.device)
        metrics["val"] = _validation_metrics(dataset.labels[val], probs, dataset.tasks)
    labels = {"task": "classify", "tasks": dataset.tasks, "class_names": dataset.class_names,
              "single_label": dataset.single_label}
    head = {"kind": "linear", "num_classes": n_classes}
    return finish(session, model.cpu(), head, labels, metrics)
