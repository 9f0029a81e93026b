"""The student network of pretraining: backbone and the three heads, run in one ``forward``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from holons.ssl.backbone import create_backbone
from holons.ssl.config import PretrainConfig
from holons.ssl.heads import CompositionHead, DecompositionHead, LocalizabilityHead

__all__ = ["Encoder", "StudentNet", "build_student", "embed_grouped"]


class Encoder(nn.Module):
    """Backbone + localizability head: what the EMA teacher copies."""

    def __init__(self, backbone: nn.Module, loc_head: LocalizabilityHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.loc_head = loc_head


class StudentNet(nn.Module):
    """Student backbone and the three heads, run in one ``forward`` (one DDP call per step).

    ``forward(inputs, project, compose, decompose)``: ``inputs`` maps names to image stacks
    ``N x 1 x S x S``; stacks of equal size share one backbone call. Returns the embeddings of
    every input, localizability logits (and the bottleneck embeddings they score, ``proj``) for the
    names in ``project``, the composition of the
    parts stack ``compose`` (``B*k2`` rows, sample-major) and the decomposition of ``decompose``.
    """

    def __init__(self, encoder: Encoder, comp_head: CompositionHead, dec_head: DecompositionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.comp_head = comp_head
        self.dec_head = dec_head

    def forward(self, inputs: dict[str, torch.Tensor], project: tuple[str, ...] = (),
                compose: str | None = None, decompose: str | None = None) -> dict[str, Any]:
        emb = embed_grouped(self.encoder.backbone, inputs)
        out: dict[str, Any] = {"emb": emb}
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
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=1, **m.backbone_kwargs)
    d, k2 = backbone.embed_dim, cfg.views.k ** 2
    loc = LocalizabilityHead(d, m.out_dim, hidden=m.head_hidden, bottleneck=m.head_bottleneck,
                             nlayers=m.head_layers)
    return StudentNet(Encoder(backbone, loc), CompositionHead(d, k2),
                      DecompositionHead(d, k2, m.decomposition_norm))
