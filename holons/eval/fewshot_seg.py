"""Few-shot segmentation: a small U-Net-style decoder over the backbone's multi-scale features.

Protocol: for each shot count N and seed, N support images are drawn (seeded) from the train
split; a decoder (and, in ``finetune`` mode, the encoder too) is trained on them with mild
random affine augmentation, then Dice per structure is measured on the evaluation split (JSRT:
train -> val of ``hybridgnet_split``; phantoms: train -> test). Structures are predicted as
independent sigmoid channels, since clavicles overlap the lungs. Images and masks are resized
to ``size x size``; Dice is computed in that frame.

Small structures get a fair chance at CPU scale (few steps, 96-128 px): the decoder reaches full
resolution with the input image as its skip, lungs / heart / clavicles have a decoder each, and the
loss is a per-image soft Dice (each structure weighs the same whatever its area) plus a class-balanced
BCE. With the earlier protocol (one shared decoder, plain BCE + Dice) the clavicles' Dice was 0.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from holons.errors import HolonsError
from holons.eval.features import (
    describe_weights,
    input_stats,
    load_backbone,
    progress_enabled,
    resolve_device,
    to_input,
)
from holons.eval.landmark_data import (
    STRUCTURES,
    AnnotatedRadiographs,
    load_annotated,
    resize_image,
    resize_mask,
)
from holons.eval.metrics import dice
from holons.eval.results import format_table, write_results
from holons.ssl.backbone import Backbone

__all__ = [
    "MODES", "DEFAULT_STEPS", "STRUCTURE_GROUPS", "UNetDecoder", "Segmenter", "SegmentationLoss",
    "FewShotResult", "structure_groups", "train_segmenter", "predict_masks", "evaluate_fewshot_segmentation",
    "run_fewshot_segmentation", "format_fewshot",
]

MODES = ("frozen", "finetune")
# Decoder steps: at 128 px with 12 JSRT support images, 60 steps left the decoder unable to fit its own
# support set (clavicle Dice 0.26-0.52 on the training images), so a comparison ranked how fast decoders
# converge rather than the features; 240 fit most of it (lungs 0.97, clavicles 0.69-0.81; 480 steps:
# 0.84-0.88) at 4x the cost (docs/notes/lab_notebook.md, "Few-shot decoder steps").
DEFAULT_STEPS = 240
STRUCTURE_GROUPS = {"lungs": ("right_lung", "left_lung"), "clavicles": ("right_clavicle", "left_clavicle")}


def _block(cin: int, cout: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers += [nn.Conv2d(c, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNetDecoder(nn.Module):
    """U-Net-style decoder over a backbone pyramid, with logits at the input's full resolution.

    From the deepest map: upsample, concatenate the next shallower map, convolve. Backbone pyramids
    start at stride 4 (ConvNeXt) or coarser (ViT), too coarse for thin structures such as the
    clavicles (a few pixels wide at 128 px), so with ``image_width > 0`` the decoder goes on
    upsampling by 2 down to stride 1 (``first_stride``: the stride of the shallowest map), and at
    each of these extra scales a small convolution block on the input image, average-pooled to that
    scale, is the skip (as the input block of MONAI's UNETR). Those stages have ``image_width``
    channels. ``image_width=0`` decodes from the backbone's features alone and upsamples the last map
    to the input size.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 16,
                 image_width: int = 16, first_stride: int = 4) -> None:
        super().__init__()
        chans = list(in_channels)
        self.bottom = _block(chans[-1], width)
        self.ups = nn.ModuleList(_block(width + c, width) for c in reversed(chans[:-1]))
        n_extra = round(math.log2(first_stride)) if image_width > 0 and first_stride > 1 else 0
        self.image_blocks = nn.ModuleList(_block(1, image_width) for _ in range(n_extra))
        self.refine = nn.ModuleList(_block((width if i == 0 else image_width) + image_width, image_width)
                                    for i in range(n_extra))
        self.final = _block(width, width) if n_extra == 0 else nn.Identity()
        self.head = nn.Conv2d(image_width if n_extra else width, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_size: tuple[int, int],
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at ``out_size``; ``image`` (``B x 1 x H x W`` at ``out_size``) feeds the image skips."""
        x = self.bottom(feats[-1])
        for block, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        if not self.refine:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
            return self.head(self.final(x))
        if image is None or tuple(image.shape[-2:]) != tuple(out_size):
            raise ValueError(f"this decoder needs the input image at {tuple(out_size)} as a skip")
        n = len(self.refine)
        for i, (image_block, block) in enumerate(zip(self.image_blocks, self.refine, strict=True)):
            factor = 2 ** (n - 1 - i)
            size = (out_size[0] // factor, out_size[1] // factor)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            img = F.adaptive_avg_pool2d(image, size) if factor > 1 else image
            x = block(torch.cat([x, image_block(img)], dim=1))
        return self.head(x)


def _first_stride(backbone: Backbone) -> int:
    """Stride of the shallowest ``forward_pyramid`` map (timm's feature_info ``reduction``, else 4)."""
    info = getattr(backbone.model, "feature_info", None)
    try:
        return int(info[0]["reduction"]) if info else 4
    except (KeyError, TypeError, IndexError, ValueError):
        return 4


def structure_groups(structures: Sequence[str] = STRUCTURES) -> list[list[int]]:
    """Channel indices of ``structures`` that share a decoder: each of ``STRUCTURE_GROUPS`` (left and
    right told apart jointly), every other structure alone."""
    groups, placed = [], set()
    for s in structures:
        if s in placed:
            continue
        members = next((m for m in STRUCTURE_GROUPS.values() if s in m), (s,))
        group = [structures.index(m) for m in members if m in structures]
        placed.update(structures[k] for k in group)
        groups.append(group)
    return groups


class Segmenter(nn.Module):
    """Backbone pyramid + U-Net decoder(s); with ``frozen`` the encoder runs without gradients in eval mode.

    ``groups`` partitions the output channels; each part gets its own decoder (None: one decoder for
    all). With one shared decoder the large structures (lungs, heart) shape its features within a few
    steps and small ones (clavicles) are left without capacity; separate decoders per group remove
    that competition.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, frozen: bool, width: int = 16,
                 image_width: int = 16, groups: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        parts = [list(range(num_classes))] if groups is None else [list(map(int, g)) for g in groups]
        if sorted(k for g in parts for k in g) != list(range(num_classes)) or not all(parts):
            raise HolonsError(f"groups must partition the {num_classes} output channels, got {groups}")
        self.backbone = backbone
        self.frozen = frozen
        self.groups = parts
        stride = _first_stride(backbone)
        self.decoders = nn.ModuleList(
            UNetDecoder(backbone.feature_channels(), len(g), width, image_width, first_stride=stride)
            for g in parts)
        self.register_buffer("order", torch.argsort(torch.tensor([k for g in parts for k in g])),
                             persistent=False)
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.backbone.forward_pyramid(x)
        logits = torch.cat([d(feats, x.shape[-2:], x) for d in self.decoders], dim=1)
        return logits.index_select(1, self.order)


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
) -> Segmenter:
    """Train a ``Segmenter`` on normalized ``images`` (``N x 1 x S x S``) and float ``masks``
    (``N x K x S x S``).

    ``lr`` (decoders) and ``encoder_lr`` (``finetune`` mode) peak after a linear warm-up over the
    first tenth of ``steps`` and decay to 0 on a cosine. ``width`` / ``image_width``: decoder channels
    at the backbone's scales / at the finer scales fed by the input image (0: no image skips, logits
    upsampled from the shallowest map). ``groups``: output channels that share a decoder (None: one
    for all; see ``structure_groups``). ``bce_weight`` / ``balance_bce``: the BCE term next to the soft
    Dice (``SegmentationLoss``). The backbone is deep-copied, so the caller's weights stay untouched in
    ``finetune`` mode.
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
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen) if n > batch_size else torch.arange(n)
        x, y = images[idx].to(device), masks[idx].to(device)
        if augment:
            x, y = _augment(x, y, gen)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_masks(model: Segmenter, images: torch.Tensor, *, batch_size: int = 8,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Binary masks (``N x K x S x S`` bool) at threshold 0.5 of the sigmoid."""
    model.eval()
    out = [torch.sigmoid(model(images[i:i + batch_size].to(device))).cpu() > 0.5
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out).numpy()


@dataclass
class FewShotResult:
    """``summary`` (JSON-ready dict) and ``scores`` (one row per mode, shots, seed, image, structure)."""

    summary: dict
    scores: pd.DataFrame


def _load_split(data: AnnotatedRadiographs, ids: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([resize_image(data.read(i), size) for i in ids])
    masks = np.stack([resize_mask(data.masks(i), size) for i in ids])
    return images, masks


def evaluate_fewshot_segmentation(
    backbone: Backbone,
    data: AnnotatedRadiographs,
    *,
    shots: Sequence[int] = (3, 6, 12, 24),
    seeds: Sequence[int] = (0, 1, 2),
    modes: Sequence[str] = MODES,
    size: int = 128,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    lr: float = 3e-3,
    encoder_lr: float = 1e-4,
    width: int = 16,
    image_width: int = 16,
    group_decoders: bool = True,
    bce_weight: float = 1.0,
    balance_bce: bool = True,
    support_split: str = "train",
    eval_split: str | None = "auto",
    max_eval: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> FewShotResult:
    """Dice per structure for every (mode, shots, seed); summary = mean and std over seeds.

    ``summary["support_dice"]`` holds the same for the support images themselves: a decoder that does
    not fit its own support set (well below 1, thin structures first) needs more ``steps``.

    Decoder and loss (see ``train_segmenter``): ``image_width`` channels at the scales finer than the
    backbone's pyramid, fed by the input image, so that logits are made at full resolution from
    full-resolution evidence (0: the older decoder over the pyramid alone); ``group_decoders`` gives
    lungs, heart and clavicles a decoder each (False: one shared decoder, in which the clavicles
    lose out to the large structures); ``bce_weight`` / ``balance_bce``: the (class-balanced) BCE term
    next to the soft Dice (``SegmentationLoss``).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device if device is None else str(device))
    for m in modes:
        if m not in MODES:
            raise HolonsError(f"unknown mode {m!r}; choose from {MODES}")
    eval_split = data.default_eval_split() if eval_split == "auto" else eval_split
    pool = data.ids(support_split)
    eval_ids = data.ids(eval_split)[: max_eval or None]
    if not eval_ids:
        raise HolonsError(f"no evaluation images in split {eval_split!r}")
    if not pool or max(shots) > len(pool):
        raise HolonsError(f"{max(shots)} shots need that many images in split {support_split!r}, "
                          f"found {len(pool)}")
    stats = input_stats(backbone)
    show = progress_enabled(progress)
    ev_img, ev_mask = _load_split(data, eval_ids, size)
    ev_x = to_input(ev_img, stats)
    support_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    groups = structure_groups(STRUCTURES) if group_decoders else None
    runs = [(m, n, s) for m in modes for n in shots for s in seeds]
    rows, support_rows = [], []
    for mode, n, seed in tqdm(runs, desc="few-shot runs", disable=not show):
        chosen = [pool[i] for i in np.random.default_rng([seed, n]).choice(len(pool), size=n, replace=False)]
        for i in chosen:
            if i not in support_cache:
                img, msk = _load_split(data, [i], size)
                support_cache[i] = (img[0], msk[0])
        x = to_input(np.stack([support_cache[i][0] for i in chosen]), stats)
        support_masks = np.stack([support_cache[i][1] for i in chosen])
        y = torch.from_numpy(support_masks.astype(np.float32))
        model = train_segmenter(backbone, x, y, mode=mode, steps=steps, batch_size=batch_size, lr=lr,
                                encoder_lr=encoder_lr, width=width, image_width=image_width, groups=groups,
                                bce_weight=bce_weight, balance_bce=balance_bce, seed=seed, device=dev)
        scored = ((rows, eval_ids, ev_x, ev_mask), (support_rows, chosen, x, support_masks))
        for out_rows, ids, inputs, truth in scored:  # the evaluation images, then the support set itself
            pred = predict_masks(model, inputs, batch_size=batch_size, device=dev)
            out_rows += [(mode, n, seed, image_id, s, dice(pred[j, k], truth[j, k]))
                         for j, image_id in enumerate(ids) for k, s in enumerate(STRUCTURES)]
    columns = ["mode", "shots", "seed", "image", "structure", "dice"]
    scores = pd.DataFrame(rows, columns=columns)
    summary = {
        "protocol": "fewshot-seg", "support_split": support_split, "eval_split": eval_split or "all",
        "eval_images": len(eval_ids), "size": size, "steps": steps, "shots": list(shots),
        "decoder": {"width": width, "image_width": image_width, "group_decoders": group_decoders,
                    "bce_weight": bce_weight, "balance_bce": balance_bce, "lr": lr},
        "seeds": list(seeds), "modes": list(modes), "dice": _summarize(scores),
        "support_dice": _summarize(pd.DataFrame(support_rows, columns=columns)),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return FewShotResult(summary=summary, scores=scores)


def _summarize(scores: pd.DataFrame) -> dict:
    """{mode: {shots: {structure or group: {"mean", "std", "per_seed"}}}}: per-seed mean Dice over images,
    then mean and standard deviation over seeds. Groups (lungs, clavicles) average their structures."""
    per_seed = scores.groupby(["mode", "shots", "seed", "structure"])["dice"].mean()
    out: dict = {}
    for (mode, n), block in per_seed.groupby(level=["mode", "shots"]):
        table = block.unstack("structure")  # seeds x structures
        for group, members in STRUCTURE_GROUPS.items():
            table[group] = table[list(members)].mean(axis=1)
        table["mean"] = table[list(STRUCTURES)].mean(axis=1)
        out.setdefault(mode, {})[str(n)] = {
            col: {"mean": float(table[col].mean()), "std": float(table[col].std(ddof=0)),
                  "per_seed": [float(v) for v in table[col]]}
            for col in table.columns
        }
    return out


def format_fewshot(summary: dict) -> str:
    """A short table: mean Dice (± std over seeds) per mode, shots and structure group, and the mean
    Dice on the support images themselves ("support fit": well below 1 means too few decoder steps)."""
    cols = ["heart", "lungs", "clavicles", "mean"]
    fit = summary.get("support_dice", {})
    rows = []
    for mode, by_n in summary["dice"].items():
        for n, d in by_n.items():
            cells = {c: f"{d[c]['mean']:.3f}±{d[c]['std']:.3f}" for c in cols}
            support = fit.get(mode, {}).get(n)
            cells["support fit"] = f"{support['mean']['mean']:.3f}" if support else "-"
            rows.append({"mode": mode, "shots": n, **cells})
    return format_table(rows, ["mode", "shots", *cols, "support fit"])


def run_fewshot_segmentation(
    weights: str | Path, data: str | Path, out: str | Path, *, arch: str | None = None, **settings
) -> dict:
    """Load ``weights``, run the protocol on the set at ``data``, write ``OUT/results.json`` and
    ``OUT/dice.csv``; return the summary."""
    backbone = load_backbone(weights, arch)
    result = evaluate_fewshot_segmentation(backbone, load_annotated(data), **settings)
    summary = {**describe_weights(weights, backbone), "data": str(data), **result.summary}
    write_results(out, summary, {"dice": result.scores})
    return summary
