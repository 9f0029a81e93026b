"""Per-phase losses of the Varifocal schedule: cross-entropy on soft targets, chromosome CutMix
with foreground-area label mixing, the localizer's box regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.data import FOREGROUND_THRESHOLD
from holons.finetune.karyotype.model import VarifocalNet, box_targets
from holons.finetune.karyotype.schedule import Phase


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
    """Mean CE against probability targets; rows with ``weight == 0`` do not count."""
    per = -(target * F.log_softmax(logits, dim=1)).sum(1)
    if weight is None:
        return per.mean()
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


def chromosome_cutmix(images: torch.Tensor, labels: torch.Tensor, polarity: torch.Tensor,
                      generator: torch.Generator, prob: float, alpha: float):
    """CutMix with foreground-area label mixing: lambda = share of the mixed image's foreground
    (pixels > threshold) that comes from the image itself, not the pasted area.

    Returns images, type targets (N x 24), polarity targets (N x 2), polarity weights (0 where a
    polarity involved is unknown). Uses :mod:`holons.anatomy.mixing`.
    """
    from holons.anatomy.mixing import box_masks, cutmix, foreground_lambda

    n, _, h, w = images.shape
    mixed = cutmix(images, generator=generator, prob=prob, alpha=alpha)
    paste = box_masks(mixed.boxes, (h, w))
    partner_images = images[mixed.partner]
    lam = foreground_lambda(images, partner_images, paste, threshold=FOREGROUND_THRESHOLD)
    lam = torch.where(mixed.applied, lam, torch.ones_like(lam))[:, None]
    type_t = lam * F.one_hot(labels, 24).float() + (1 - lam) * F.one_hot(labels[mixed.partner], 24).float()
    known = (polarity >= 0) & ((polarity[mixed.partner] >= 0) | ~mixed.applied)
    pa = F.one_hot(polarity.clamp_min(0), 2).float()
    pol_t = lam * pa + (1 - lam) * pa[mixed.partner]
    return mixed.images, type_t, pol_t, known.float()


def _targets(labels, polarity):
    return F.one_hot(labels, 24).float(), F.one_hot(polarity.clamp_min(0), 2).float(), (polarity >= 0).float()


def phase_loss(model: VarifocalNet, phase: Phase, images, labels, polarity, cfg: KaryotypeConfig,
               generator: torch.Generator | None) -> torch.Tensor:
    """The loss of one batch for ``phase`` (CutMix applied to CE phases when configured)."""
    w = cfg.train.polarity_weight
    if phase.loss == "box":
        out = model(images, ("box",))
        return F.smooth_l1_loss(out["box"], box_targets(images, FOREGROUND_THRESHOLD), beta=0.05)
    if generator is not None and cfg.train.cutmix_prob > 0 and phase.name != "fusion" \
            and not phase.name.startswith("locrefine"):
        images, type_t, pol_t, pol_w = chromosome_cutmix(images, labels, polarity, generator,
                                                         cfg.train.cutmix_prob, cfg.train.cutmix_alpha)
    else:
        type_t, pol_t, pol_w = _targets(labels, polarity)
    parts = {"g": ("g",), "l": ("l",), "fusion": ("fusion",)}[phase.loss]
    out = model(images, parts)
    key_t, key_p = {"g": ("g_type", "g_polarity"), "l": ("l_type", "l_polarity"),
                    "fusion": ("type", "polarity")}[phase.loss]
    loss = soft_cross_entropy(out[key_t], type_t) + w * soft_cross_entropy(out[key_p], pol_t, pol_w)
    if phase.loss == "l" and "part_loss" in out:  # a part branch's priors, while it trains
        loss = loss + out["part_loss"]
    return loss
