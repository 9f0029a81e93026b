"""DINO (the baseline): the localizability objective alone, one stage at level 0.

The student's global and local crops are trained to predict the EMA teacher's (centred, sharpened)
prototype distribution of the other global crops. With CutMix between images (``views.cutmix``),
a mixed local crop's target is the same mix of the two images' teacher distributions. Adam-v2 uses
this objective for its localizability stages. Informed masking (``mask.enabled``,
:mod:`holons.ssl.methods.informed_masking`) adds its terms to it.
"""

from __future__ import annotations

import torch

from holons.anatomy import Views
from holons.ssl.config import PretrainConfig, Segment, curriculum_segments
from holons.ssl.losses import mix_teacher_probs
from holons.ssl.methods.base import (
    LossContext,
    Losses,
    Method,
    finish,
    flat_views,
    split_views,
    student_view_logits,
    view_counts,
)
from holons.ssl.methods.informed_masking import (
    add_masking_losses,
    informed_views,
    masked_inputs,
    student_call_args,
)


def localizability_losses(ctx: LossContext, v: Views, seg: Segment) -> Losses:
    """Every (student view, other teacher global view) pair, scored by the localizability loss."""
    b, n_g, n_l, box_mix = view_counts(v)
    with torch.no_grad(), ctx.autocast():
        t_emb = ctx.teacher.backbone(flat_views(ctx, v.global_crops))
        t_logits = ctx.teacher.loc_head(t_emb).float().unflatten(0, (b, n_g))
    masked = informed_views(ctx, v)
    s_in = {"global": flat_views(ctx, v.global_crops), "local": flat_views(ctx, v.local_crops),
            **masked_inputs(masked)}
    with ctx.autocast():
        s = ctx.model(s_in, project=("global", "local"), **student_call_args(masked))
    s_views = student_view_logits(s, b, n_g, n_l)
    t_views = split_views(t_logits)
    probs = [ctx.loc_loss.teacher_probs(t) for t in t_views]
    pairs = [(si, ti) for si in range(n_g + n_l) for ti in range(n_g) if si != ti]
    if box_mix:  # mixed local crops: each (crop, teacher view) pair gets its own mixed target
        mixed_pairs = []
        for si, ti in pairs:
            if si >= n_g:
                probs.append(mix_teacher_probs(probs[ti], v.partner, v.local_lambda[:, si - n_g]))
                ti = len(probs) - 1
            mixed_pairs.append((si, ti))
        pairs = mixed_pairs
    out = ctx.loc_loss(s_views, teacher_probs=probs, pairs=pairs)
    terms = {"loc": out.loss}
    total = add_masking_losses(ctx, masked, s, ctx.cfg.loss.w_loc * out.loss, terms)
    return finish(ctx, v, s, total, terms, out, t_views)


def segments(cfg: PretrainConfig, steps_per_epoch: int) -> list[Segment]:
    """The curriculum collapsed into one localizability stage at level 0 with the same total number
    of steps (the same compute budget in steps)."""
    total = curriculum_segments(cfg, steps_per_epoch)[-1].end
    return [Segment(stage=0, mode="localizability", level=0, start=0, steps=total)]


METHOD = Method("dino", localizability_losses, segments)
