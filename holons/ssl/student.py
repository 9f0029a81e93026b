"""The student network of pretraining: backbone and the three heads, run in one ``forward``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from holons.ssl.backbone import create_backbone, feature_grid
from holons.ssl.config import PretrainConfig
from holons.ssl.heads import CompositionHead, DecompositionHead, LocalizabilityHead, PatchPredictor

__all__ = ["Encoder", "StudentNet", "build_student", "embed_grouped"]


class Encoder(nn.Module):
    """Backbone + localizability head: what the EMA teacher copies."""

    def __init__(self, backbone: nn.Module, loc_head: LocalizabilityHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.loc_head = loc_head


class StudentNet(nn.Module):
    """Student backbone and its heads, run in one ``forward`` (one DDP call per step).

    ``forward(inputs, project, compose, decompose, dense, grid)``: ``inputs`` maps names to image
    stacks ``N x 1 x S x S``; stacks of equal size share one backbone call. Returns the embeddings of
    every input, localizability logits (and the bottleneck embeddings they score, ``proj``) for the
    names in ``project``, the composition of the
    parts stack ``compose`` (``B*k2`` rows, sample-major) and the decomposition of ``decompose``.
    The stacks named in ``dense`` (the masked crops of informed masking) share one further backbone
    call that also keeps their patch features: ``patch_pred`` holds the ``mask_head``'s prediction
    of the teacher's patch features, ``N x grid² x C`` in raster order.
    """

    def __init__(self, encoder: Encoder, comp_head: CompositionHead, dec_head: DecompositionHead,
                 mask_head: PatchPredictor | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.comp_head = comp_head
        self.dec_head = dec_head
        self.mask_head = mask_head

    def forward(self, inputs: dict[str, torch.Tensor], project: tuple[str, ...] = (),
                compose: str | None = None, decompose: str | None = None,
                dense: tuple[str, ...] = (), grid: int | None = None) -> dict[str, Any]:
        emb = embed_grouped(self.encoder.backbone, {n: x for n, x in inputs.items() if n not in dense})
        out: dict[str, Any] = {"emb": emb}
        if dense:
            if self.mask_head is None or grid is None:
                raise ValueError("dense inputs need the mask_head (mask.enabled) and a patch grid")
            sizes = [len(inputs[n]) for n in dense]
            pooled, maps = self.encoder.backbone.forward_pooled_dense(torch.cat([inputs[n] for n in dense]))
            pred = self.mask_head(feature_grid(maps, grid).flatten(2).transpose(1, 2))
            emb.update(zip(dense, pooled.split(sizes), strict=True))
            out["patch_pred"] = dict(zip(dense, pred.split(sizes), strict=True))
        if project:
            head = self.encoder.loc_head
            sizes = [len(emb[n]) for n in project]
            z = head.project(torch.cat([emb[n] for n in project]))
            out["proj"] = dict(zip(project, z.split(sizes), strict=True))
            out["logits"] = dict(zip(project, head.prototype_logits(z).split(sizes), strict=True))
        if compose is not None:
            k2 = self.comp_head.k2
            out["composed"] = self.comp_head(emb[compose].unflatten(0, (-1, k2)))
        if decompose is not None:
            out["decomposed"] = self.dec_head(emb[decompose])
        return out


def embed_grouped(backbone: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone embeddings of named stacks, one backbone call per distinct input size."""
    by_size: dict[tuple[int, ...], list[str]] = {}
    for name, x in inputs.items():
        by_size.setdefault(tuple(x.shape[1:]), []).append(name)
    emb: dict[str, torch.Tensor] = {}
    for names in by_size.values():
        out = backbone(torch.cat([inputs[n] for n in names]))
        emb.update(zip(names, out.split([len(inputs[n]) for n in names]), strict=True))
    return emb


def build_student(cfg: PretrainConfig) -> StudentNet:
    """The student of ``cfg``: backbone, heads, and the patch predictor when ``mask.enabled``."""
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=1, **m.backbone_kwargs)
    d, k2 = backbone.embed_dim, cfg.views.k ** 2
    loc = LocalizabilityHead(d, m.out_dim, hidden=m.head_hidden, bottleneck=m.head_bottleneck,
                             nlayers=m.head_layers)
    mask_head = (PatchPredictor(backbone.dense_channels, cfg.mask.predictor_hidden)
                 if cfg.mask.enabled else None)
    return StudentNet(Encoder(backbone, loc), CompositionHead(d, k2),
                      DecompositionHead(d, k2, m.decomposition_norm), mask_head)
