"""Informed masking (after MASCOT): mask where the teacher looks, complete the masked semantics.

A component that ``adamv2`` and ``dino`` both add to their objective when ``mask.enabled``
(:class:`~holons.ssl.config.MaskConfig`); a radiograph is mostly background and repeated anatomy, so
random masks mostly hide what is easy to repaint. For every global crop:

1. the EMA teacher sees the whole crop: its pooled embedding, its patch features on a
   ``grid x grid`` patch grid, and a saliency per patch (class-token attention of its last block for
   ViTs; for any backbone the norm of its patch features, or their similarity to the pooled embedding);
2. the high-informed mask hides the ``ratio_high`` most salient patches, the low-informed mask the
   ``ratio_low`` least salient (:func:`informed_masks`); masked pixels are set to the normalized
   data mean (0);
3. informed semantics completion: the student sees the high-masked crop and its patch predictor
   predicts the teacher's patch features; only the masked high-informed patches count
   (:func:`completion_loss`): low-informed regions are left out of the reconstruction;
4. dual-mask co-learning: the pooled student embeddings of the high- and low-masked crops agree with
   each other and with the teacher's embedding of the whole crop (:func:`agreement_loss`).

DESIGN.md scores the completion with an iBOT-style patch loss over the localizability prototypes;
this component regresses the features themselves (cosine or smooth L1), which needs no second
centring state and works for any backbone's channel count.

Usage inside a method's ``losses``: ``mv = informed_views(ctx, v)`` (None when off) before the
student call, ``masked_inputs(mv)`` added to its inputs and ``student_call_args(mv)`` to its
arguments, then ``total = add_masking_losses(ctx, mv, s,
total, terms)``. With masking off nothing of this runs, so a run is the same as without the component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from holons.anatomy import Views
from holons.errors import ConfigError
from holons.ssl.backbone import Backbone, feature_grid
from holons.ssl.config import MaskConfig
from holons.ssl.methods.base import LossContext, flat_views

__all__ = ["MaskedViews", "add_masking_losses", "agreement_loss", "class_attention", "completion_loss",
           "informed_masks", "informed_views", "mask_images", "masked_inputs", "patch_saliency",
           "saliency_kind", "student_call_args"]

HIGH, LOW = "mask_high", "mask_low"
"""The student's input names of the high- and low-masked crops."""


def _last_attention(model: nn.Module) -> nn.Module | None:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        return None
    attn = getattr(blocks[-1], "attn", None)
    return attn if attn is not None and hasattr(attn, "qkv") and hasattr(attn, "num_heads") else None


def saliency_kind(backbone: Backbone, requested: str) -> str:
    """The saliency ``mask.saliency`` means for ``backbone``: ``auto`` is attention for ViTs (a last
    block with ``attn.qkv``), feature norm otherwise; attention on another backbone is a ConfigError."""
    has_attention = _last_attention(backbone.model) is not None
    if requested == "auto":
        return "attention" if has_attention else "feature_norm"
    if requested == "attention" and not has_attention:
        raise ConfigError(f"mask.saliency=attention needs a ViT backbone; {backbone.name!r} has no attention "
                          "blocks (use feature_norm or pooled_similarity)")
    return requested


def class_attention(attn: nn.Module, tokens: torch.Tensor, prefix: int, has_class_token: bool
                    ) -> torch.Tensor:
    """Attention over the patch tokens, ``B x N_patches``, of one timm attention module fed ``tokens``
    (its input, ``B x N x C``): the class token's attention (mean over heads), or without a class token
    the mean attention each patch receives."""
    b, n, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1).mean(1)  # B x N x N
    received = weights[:, 0] if has_class_token else weights.mean(1)
    return received[:, prefix:]


def patch_saliency(backbone: Backbone, x: torch.Tensor, kind: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of ``backbone`` over ``x``: (pooled embedding ``B x D``, patch features ``B x C x h x w``,
    saliency ``B x 1 x h x w``) with ``kind`` from :func:`saliency_kind`."""
    captured: list[torch.Tensor] = []
    hook = None
    if kind == "attention":
        attn = _last_attention(backbone.model)
        hook = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        pooled, maps = backbone.forward_pooled_dense(x)
    finally:
        if hook is not None:
            hook.remove()
    if kind == "attention":
        model = backbone.model
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        has_cls = getattr(model, "cls_token", None) is not None
        saliency = class_attention(_last_attention(model), captured[0], prefix, has_cls).float()
        return pooled, maps, saliency.unflatten(1, maps.shape[-2:]).unsqueeze(1)
    if kind == "feature_norm":
        return pooled, maps, maps.float().norm(dim=1, keepdim=True)
    if kind == "pooled_similarity":
        if pooled.shape[1] != maps.shape[1]:
            raise ConfigError(f"mask.saliency=pooled_similarity: backbone {backbone.name!r} pools to "
                              f"{pooled.shape[1]} channels from {maps.shape[1]}; use feature_norm")
        sim = F.cosine_similarity(maps.float(), pooled.float()[:, :, None, None], dim=1)
        return pooled, maps, sim.unsqueeze(1)
    raise ConfigError(f"mask.saliency: unknown kind {kind!r}")


def informed_masks(saliency: torch.Tensor, ratio_high: float, ratio_low: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``B x N`` of the ``round(ratio_high * N)`` most salient patches (high-informed)
    and the ``round(ratio_low * N)`` least salient (low-informed), each at least one patch and at most
    ``N - 1`` (a crop is never hidden whole). Ties go to the lower patch index."""
    b, n = saliency.shape
    masks = []
    for ratio, largest in ((ratio_high, True), (ratio_low, False)):
        count = min(n - 1, max(1, round(ratio * n)))
        # a stable sort keeps tied patches in index order, so the masks do not depend on the device
        order = torch.sort(saliency.float(), dim=1, descending=largest, stable=True).indices[:, :count]
        masks.append(torch.zeros(b, n, dtype=torch.bool, device=saliency.device).scatter_(1, order, True))
    return masks[0], masks[1]


def mask_images(x: torch.Tensor, mask: torch.Tensor, grid: int, fill: float = 0.0) -> torch.Tensor:
    """Images ``B x C x S x S`` with the patches of ``mask`` (``B x grid²``, raster order) set to ``fill``."""
    cells = mask.view(-1, 1, grid, grid).to(x.dtype)
    pixels = F.interpolate(cells, size=x.shape[-2:], mode="nearest").bool()
    return x.masked_fill(pixels, fill)


def completion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "cosine"
                    ) -> torch.Tensor:
    """Mean over the masked patches (``mask``, ``B x N``) of the distance between predicted and target
    patch features (``B x N x C``): ``1 - cosine``, or smooth L1 between layer-normalized features.
    Patches outside ``mask`` do not count at all."""
    p, t = pred.float()[mask], target.detach().float()[mask]
    if kind == "cosine":
        return (1 - F.cosine_similarity(p, t, dim=-1)).mean()
    if kind == "smooth_l1":
        c = p.shape[-1]
        return F.smooth_l1_loss(F.layer_norm(p, (c,)), F.layer_norm(t, (c,)))
    raise ConfigError(f"mask.loss: unknown loss {kind!r}")


def agreement_loss(high: torch.Tensor, low: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Dual-mask co-learning: mean cosine distance of the pooled embeddings of the high- and low-masked
    views to each other and of each to the teacher's embedding of the unmasked view (no gradient)."""
    high, low, teacher = high.float(), low.float(), teacher.detach().float()
    pairs = ((high, low), (high, teacher), (low, teacher))
    return torch.stack([(1 - F.cosine_similarity(a, b, dim=-1)).mean() for a, b in pairs]).mean()


@dataclass
class MaskedViews:
    """The teacher's side of one step's informed masking (all rows: global crops, sample-major)."""

    inputs: dict[str, torch.Tensor]
    """The student inputs ``mask_high`` and ``mask_low`` (normalized, masked crops)."""
    high: torch.Tensor
    """``N x grid²`` bool: the high-informed masked patches."""
    low: torch.Tensor
    """``N x grid²`` bool: the low-informed masked patches."""
    target: torch.Tensor
    """``N x grid² x C``: the teacher's patch features of the unmasked crops."""
    teacher_emb: torch.Tensor
    """``N x D``: the teacher's pooled embeddings of the unmasked crops."""
    grid: int


def _grid_size(cfg: MaskConfig, maps: torch.Tensor) -> int:
    if cfg.grid is not None:
        return cfg.grid
    side = min(maps.shape[-2:])
    if side < 2:
        raise ConfigError(f"mask.grid: the teacher's patch map is {side}x{side} at this crop size; "
                          "set mask.grid (patches per side) to 2 or more")
    return side


@torch.no_grad()
def informed_views(ctx: LossContext, v: Views) -> MaskedViews | None:
    """The masks, masked crops and teacher targets of the global crops of ``v``; None when masking is off."""
    cfg = ctx.cfg.mask
    if not cfg.enabled:
        return None
    x = flat_views(ctx, v.global_crops)
    backbone = ctx.teacher.backbone
    with ctx.autocast():
        pooled, maps, saliency = patch_saliency(backbone, x, saliency_kind(backbone, cfg.saliency))
    grid = _grid_size(cfg, maps)
    target = feature_grid(maps.float(), grid).flatten(2).transpose(1, 2)
    high, low = informed_masks(feature_grid(saliency, grid).flatten(1), cfg.ratio_high, cfg.ratio_low)
    inputs = {HIGH: mask_images(x, high, grid), LOW: mask_images(x, low, grid)}
    return MaskedViews(inputs, high, low, target, pooled.float(), grid)


def masked_inputs(mv: MaskedViews | None) -> dict[str, torch.Tensor]:
    """The student inputs of the masked crops (none when masking is off)."""
    return {} if mv is None else mv.inputs


def student_call_args(mv: MaskedViews | None) -> dict[str, Any]:
    """Keyword arguments of the student call that add the masked crops (none when masking is off)."""
    return {} if mv is None else {"dense": (HIGH, LOW), "grid": mv.grid}


def add_masking_losses(ctx: LossContext, mv: MaskedViews | None, s: dict[str, Any], total: torch.Tensor,
                       terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """``total`` plus the weighted completion and agreement terms (added to ``terms`` as ``complete``
    and ``agree``, logged as ``loss_complete`` / ``loss_agree``); ``total`` as it is when off."""
    if mv is None:
        return total
    cfg = ctx.cfg.mask
    terms["complete"] = completion_loss(s["patch_pred"][HIGH], mv.target, mv.high, cfg.loss)
    terms["agree"] = agreement_loss(s["emb"][HIGH], s["emb"][LOW], mv.teacher_emb)
    return total + cfg.w_complete * terms["complete"] + cfg.w_agree * terms["agree"]
