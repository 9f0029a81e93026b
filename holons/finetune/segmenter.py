"""``holons finetune segment``: a segmenter for whatever structures the data's masks name.

``finetune_segment(config, data=..., out=...)`` reads every image and its masks through the
preprocessing contract (``holons.data.preprocess``: the foundation's, else letterbox at ``size``),
trains a :class:`~holons.finetune.heads.Segmenter` (full fine-tuning or a frozen encoder; all
training images, a fraction, or ``shots`` of them) and writes a model folder
(``holons.finetune.model_folder``) with the validation Dice per structure (on the canvas).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from holons.data.annotated import SegmentationSet, load_segmentation_set
from holons.errors import HolonsError
from holons.finetune.backbones import to_input
from holons.finetune.config import SegmentConfig
from holons.finetune.heads import Segmenter, optimizer_step, structure_groups
from holons.finetune.inputs import READ_ERRORS, log_and_print, read_canvases, take_subset, train_val_indices
from holons.finetune.metrics import dice
from holons.finetune.model_folder import FinetuneResult
from holons.finetune.session import Session, begin, finish
from holons.ssl.backbone import Backbone

__all__ = ["MODES", "DEFAULT_STEPS", "SegmentationLoss", "train_segmenter", "predict_probabilities",
           "predict_masks", "finetune_segment"]

MODES = ("frozen", "finetune")
# Decoder steps: at 128 px with 12 JSRT support images, 60 steps left the decoder unable to fit its own
# support set (clavicle Dice 0.26-0.52 on the training images), so a comparison ranked how fast decoders
# converge rather than the features; 240 fit most of it (lungs 0.97, clavicles 0.69-0.81; 480 steps:
# 0.84-0.88) at 4x the cost (docs/notes/lab_notebook.md, "Few-shot decoder steps").
DEFAULT_STEPS = 240


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random small affine (rotation ±8°, zoom 0.9-1.1, shift ±6 %) for images and masks."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(8)
    scale = 1.0 + 0.1 * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rows = [torch.stack([cos, -sin, 0.12 * u[:, 2]], 1), torch.stack([sin, cos, 0.12 * u[:, 3]], 1)]
    theta = torch.stack(rows, 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ya = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return xa, ya


class SegmentationLoss(nn.Module):
    """Soft Dice per image and structure (MONAI ``DiceLoss`` on sigmoids) plus ``bce_weight`` x BCE.

    Dice weighs every structure of every image alike, whatever its area. Plain BCE is calibrated:
    where a thin structure's position is uncertain by a pixel or two its probabilities settle below
    0.5 and the thresholded mask is empty (the clavicles' Dice 0 of the earlier protocol). With
    ``balance_bce`` the BCE is class-balanced per structure (as for HED's thin edges): positives
    weigh ``(1 - f) / f`` for a foreground fraction ``f`` in the batch, so thin structures reach 0.5
    while the bulk background is still pushed to 0, which Dice alone does too weakly. (MONAI's
    ``DiceCELoss`` is not used: with several channels its CE term is a softmax cross-entropy, wrong
    for overlapping structures.)
    """

    def __init__(self, bce_weight: float = 1.0, balance_bce: bool = True) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        if bce_weight < 0:
            raise HolonsError(f"bce_weight must be >= 0, got {bce_weight}")
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)
        self.bce_weight = float(bce_weight)
        self.balance_bce = balance_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice(logits, target)
        if self.bce_weight:
            pos_weight = None
            if self.balance_bce:
                f = target.mean(dim=(0, *range(2, target.ndim))).clamp(1e-3, 1 - 1e-3)
                pos_weight = ((1 - f) / f).view(-1, *[1] * (target.ndim - 2))
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits, target,
                                                                              pos_weight=pos_weight)
        return loss


def train_segmenter(
    backbone: Backbone,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    mode: str = "frozen",
    steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    lr: float = 3e-3,
    encoder_lr: float = 1e-4,
    width: int = 16,
    image_width: int = 16,
    groups: Sequence[Sequence[int]] | None = None,
    bce_weight: float = 1.0,
    balance_bce: bool = True,
    augment: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Segmenter:
    """Train a ``Segmenter`` on normalized ``images`` (``N x 1 x S x S``) and float ``masks``
    (``N x K x S x S``).

    ``lr`` (decoders) and ``encoder_lr`` (``finetune`` mode) peak after a linear warm-up over the
    first tenth of ``steps`` and decay to 0 on a cosine. ``width`` / ``image_width``: decoder channels
    at the backbone's scales / at the finer scales fed by the input image (0: no image skips, logits
    upsampled from the shallowest map). ``groups``: output channels that share a decoder (None: one
    for all; see ``structure_groups``). ``bce_weight`` / ``balance_bce``: the BCE term next to the soft
    Dice (``SegmentationLoss``). The backbone is deep-copied, so the caller's weights stay untouched in
    ``finetune`` mode. ``progress``: a bar over the steps; ``log``: gets the loss every tenth of the steps.
    """
    if mode not in MODES:
        raise HolonsError(f"mode must be one of {MODES}, got {mode!r}")
    if steps < 1:
        raise HolonsError(f"steps must be at least 1, got {steps}")
    torch.manual_seed(seed)
    model = Segmenter(copy.deepcopy(backbone), masks.shape[1], frozen=mode == "frozen", width=width,
                      image_width=image_width, groups=groups).to(device)
    loss_fn = SegmentationLoss(bce_weight, balance_bce)
    param_groups = [{"params": model.decoders.parameters(), "lr": lr}]
    if mode == "finetune":
        param_groups.append({"params": model.backbone.parameters(), "lr": encoder_lr})
    opt = torch.optim.AdamW(param_groups, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    n = images.shape[0]
    for step in tqdm(range(steps), desc="segment steps", disable=not progress):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen) if n > batch_size else torch.arange(n)
        x, y = images[idx].to(device), masks[idx].to(device)
        if augment:
            x, y = _augment(x, y, gen)
        loss = loss_fn(model(x), y)
        optimizer_step(opt, loss, step, steps, scheduler=sched, log=log)
    return model.eval()


@torch.no_grad()
def predict_probabilities(model: Segmenter, images: torch.Tensor, *, batch_size: int = 8,
                          device: str | torch.device = "cpu") -> np.ndarray:
    """Sigmoid probabilities ``N x K x S x S`` (float32) of normalized ``images``."""
    model.eval()
    out = [torch.sigmoid(model(images[i:i + batch_size].to(device)).float()).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).numpy()


def predict_masks(model: Segmenter, images: torch.Tensor, *, batch_size: int = 8,
                  device: str | torch.device = "cpu", threshold: float = 0.5) -> np.ndarray:
    """Binary masks (``N x K x S x S`` bool): probabilities above ``threshold``."""
    return predict_probabilities(model, images, batch_size=batch_size, device=device) > threshold


def _read_set(data: SegmentationSet, rows: np.ndarray, session: Session, desc: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canvases and canvas masks of ``rows`` (unreadable images or masks skipped: reported, left out)."""
    report = log_and_print(session.logger)
    canvases, geometries = read_canvases([data.paths[i] for i in rows], session.preprocessing,
                                         show=session.show, report=report, desc=desc)
    keep, masks = [], []
    for j, (i, geometry) in enumerate(zip(rows, geometries, strict=True)):
        if geometry is None:
            continue
        try:
            source = data.read_masks(int(i))
        except READ_ERRORS as e:
            report(f"skipped {data.paths[i]}: {e}")
            continue
        if source.shape[-2:] != (geometry.orig_h, geometry.orig_w):
            report(f"skipped {data.paths[i]}: masks are {source.shape[-2]}x{source.shape[-1]}, "
                   f"the image {geometry.orig_h}x{geometry.orig_w}")
            continue
        keep.append(j)
        masks.append(session.preprocessing.mask(source, geometry))
    size = session.preprocessing.size
    stacked = np.stack(masks) if masks else np.zeros((0, len(data.structures), size, size), bool)
    return canvases[keep], stacked, rows[keep]


def dice_per_structure(pred: np.ndarray, truth: np.ndarray, structures: Sequence[str]) -> dict[str, float]:
    """Mean Dice over images per structure (``N x K x H x W`` bool each), plus their mean."""
    out = {s: float(np.mean([dice(pred[j, k], truth[j, k]) for j in range(len(pred))]))
           for k, s in enumerate(structures)}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def finetune_segment(config: SegmentConfig | str | Path | dict | None = None, *, data: str | Path,
                     out: str | Path, overrides: list[str] | dict | None = None, resume: bool = False,
                     overwrite: bool = False, progress: bool | None = None) -> FinetuneResult:
    """Fine-tune a segmenter on ``data`` (a folder of ``images/`` + ``masks/<structure>/``, JSRT, the
    phantoms, or a manifest CSV; ``holons.data.annotated``) and write the model folder ``out``.

    ``config``: a :class:`SegmentConfig`, a YAML path, a dict or None (defaults); ``overrides``:
    ``["key=value"]``. ``resume`` returns a finished run as it is; ``overwrite`` replaces it.
    """
    session = begin(SegmentConfig, config, overrides, out, resume=resume, overwrite=overwrite,
                    progress=progress)
    if isinstance(session, FinetuneResult):
        return session
    cfg: SegmentConfig = session.config
    dataset = load_segmentation_set(data)
    structures = list(dataset.structures)
    train_rows, val_rows = train_val_indices(dataset.split, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if len(train_rows) == 0:
        raise HolonsError(f"{data}: no training images")
    train_rows = train_rows[take_subset(len(train_rows), fraction=cfg.label_fraction, shots=cfg.shots,
                                        seed=cfg.seed)]
    session.log(f"structures {structures}; {len(train_rows)} training and {len(val_rows)} validation images")
    train_x, train_y, train_rows = _read_set(dataset, train_rows, session, "read training images")
    if len(train_rows) == 0:
        raise HolonsError(f"{data}: none of the training images could be read")
    groups = structure_groups(structures) if cfg.group_decoders else None
    model = train_segmenter(
        session.backbone, to_input(train_x, session.stats), torch.from_numpy(train_y.astype(np.float32)),
        mode=cfg.mode, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, encoder_lr=cfg.encoder_lr,
        width=cfg.width, image_width=cfg.image_width, groups=groups, bce_weight=cfg.bce_weight,
        balance_bce=cfg.balance_bce, augment=cfg.augment, seed=cfg.seed, device=session.device,
        progress=session.show, log=session.log)
    metrics: dict = {"task": "segment", "structures": structures, "n_train": int(len(train_rows)),
                     "mode": cfg.mode, "steps": cfg.steps, "dice_frame": "canvas"}
    predict = dict(batch_size=cfg.batch_size, device=session.device, threshold=cfg.threshold)
    metrics["train_dice"] = dice_per_structure(
        predict_masks(model, to_input(train_x, session.stats), **predict), train_y, structures)
    if len(val_rows):
        val_x, val_y, val_rows = _read_set(dataset, val_rows, session, "read validation images")
        metrics["n_val"] = int(len(val_rows))
        if len(val_rows):
            metrics["val_dice"] = dice_per_structure(
                predict_masks(model, to_input(val_x, session.stats), **predict), val_y, structures)
    head = {"kind": "unet", "width": cfg.width, "image_width": cfg.image_width,
            "groups": model.groups, "threshold": cfg.threshold}
    return finish(session, model.cpu(), head, {"task": "segment", "structures": structures}, metrics)
