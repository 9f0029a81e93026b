"""Adam-v2: localizability, composability and decomposability over a part-whole curriculum.

Localizability stages train the DINO objective (:mod:`holons.ssl.methods.dino`). Part-whole stages
score every student crop against the teacher's distribution of the whole (global crops, whole-level
local crops) or of the part it shows (part-local crops); the composition head rebuilds the teacher's
embedding of the whole from the student's embeddings of its parts (``loss.w_comp``), and the
decomposition head the parts' embeddings from the student's whole (``loss.w_dec``). Informed
masking (``mask.enabled``) adds its terms in both kinds of stage.
"""

from __future__ import annotations

import torch

from holons.anatomy import Views
from holons.ssl.config import Segment
from holons.ssl.losses import composition_loss, decomposition_loss, mix_teacher_probs
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
from holons.ssl.methods.dino import localizability_losses
from holons.ssl.methods.informed_masking import (
    add_masking_losses,
    informed_views,
    masked_inputs,
    student_call_args,
)
from holons.ssl.student import embed_grouped


def part_whole_losses(ctx: LossContext, v: Views, seg: Segment) -> Losses:
    """The localizability term against whole / part targets, plus composition and decomposition."""
    cfg = ctx.cfg
    b, n_g, n_l, box_mix = view_counts(v)
    comp_on, dec_on = ctx.branches(seg.mode)
    need_parts = dec_on or bool((v.local_part_index >= 0).any())
    k2 = v.n_parts
    with torch.no_grad(), ctx.autocast():
        t_in = {"whole": ctx.normalize(v.whole)}
        if need_parts:
            t_in["parts"] = flat_views(ctx, v.parts)
        t_emb = embed_grouped(ctx.teacher.backbone, t_in)
        t_whole_logits = ctx.teacher.loc_head(t_emb["whole"]).float()
        t_parts_logits = (ctx.teacher.loc_head(t_emb["parts"]).float().unflatten(0, (b, k2))
                          if need_parts else None)
    s_in = {"global": flat_views(ctx, v.global_crops), "local": flat_views(ctx, v.local_crops)}
    if comp_on:
        s_in["parts"] = flat_views(ctx, v.parts)
    if dec_on:
        s_in["whole"] = ctx.normalize(v.whole)
    masked = informed_views(ctx, v)
    s_in.update(masked_inputs(masked))
    with ctx.autocast():
        s = ctx.model(s_in, project=("global", "local"), compose="parts" if comp_on else None,
                      decompose="whole" if dec_on else None, **student_call_args(masked))
    s_views = student_view_logits(s, b, n_g, n_l)
    teacher_logits = [t_whole_logits]
    probs = [ctx.loc_loss.teacher_probs(t_whole_logits)]
    if t_parts_logits is not None:
        teacher_logits += split_views(t_parts_logits)
        probs += [ctx.loc_loss.teacher_probs(t) for t in split_views(t_parts_logits)]
    targets = [0] * n_g + [0 if int(p) < 0 else 1 + int(p) for p in v.local_part_index.tolist()]
    if box_mix:
        lams = torch.cat([v.global_lambda, v.local_lambda], dim=1)
        for si in range(n_g + n_l):
            probs.append(mix_teacher_probs(probs[targets[si]], v.partner, lams[:, si]))
            targets[si] = len(probs) - 1
    out = ctx.loc_loss(s_views, teacher_probs=probs, pairs=list(enumerate(targets)))
    terms = {"loc": out.loss}
    total = cfg.loss.w_loc * out.loss
    if comp_on:
        terms["comp"] = composition_loss(s["composed"], t_emb["whole"], cfg.loss.embed_reduction)
        total = total + cfg.loss.w_comp * terms["comp"]
    if dec_on:
        t_parts = t_emb["parts"].unflatten(0, (b, k2))
        terms["dec"] = decomposition_loss(s["decomposed"], t_parts, cfg.loss.embed_reduction)
        total = total + cfg.loss.w_dec * terms["dec"]
    total = add_masking_losses(ctx, masked, s, total, terms)
    return finish(ctx, v, s, total, terms, out, teacher_logits)


def losses(ctx: LossContext, v: Views, seg: Segment) -> Losses:
    """The step's objective: localizability stages as DINO, part-whole stages as above."""
    if seg.mode == "localizability":
        return localizability_losses(ctx, v, seg)
    return part_whole_losses(ctx, v, seg)


METHOD = Method("adamv2", losses)
