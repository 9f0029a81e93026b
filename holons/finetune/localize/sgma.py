"""Semantic-guided multi-attention localization (after Zhu et al.).

``parts`` attention maps come from the feature map (a 1x1 convolution, softmax over space). For each,
a square around its centre (``crop="soft"``: the attention's centroid, differentiable; ``"peak"``: its
arg-max) covering ``crop_fraction`` of the image side is cropped from the input and zoomed to
``part_size`` pixels, then encoded by the part branch (the same backbone, its own projection). The
global and part embeddings are concatenated and classified, trained with softmax cross-entropy plus a
class-centre triplet loss (each embedding nearer its own class centre than any other by ``margin``)
and a diversity term that keeps the attention maps apart.

Class attributes (``attributes``: a ``K x A`` table, or ``"iscn"`` for the 24 chromosome types'
relative length and centromeric index from ``holons.data.chromosome_attributes``) replace the
linear classifier by an embedding softmax: logits are scaled cosines between the embedding and each
class's attribute vector mapped into the embedding space.

The localization map averages the global classifier's CAM and the attention maps weighted by each
part's share of the target class's logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from holons.finetune.localize.base import Localizer, LossTerms, normalize_maps
from holons.ssl.backbone import Backbone

__all__ = ["SGMALocalizer", "attention_diversity", "centre_triplet_loss", "crop_boxes", "zoom_crops"]

CROPS = ("soft", "peak")


def centre_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                        margin: float) -> torch.Tensor:
    """Mean hinge ``max(0, d(f, c_y) - min_{k != y} d(f, c_k) + margin)`` with squared distances
    between unit vectors (embeddings and centres are normalized here)."""
    f, c = F.normalize(embeddings, dim=1), F.normalize(centres, dim=1)
    d = torch.cdist(f, c).pow(2)
    pos = d.gather(1, labels[:, None])[:, 0]
    neg = d.masked_fill(F.one_hot(labels, c.shape[0]).bool(), float("inf")).amin(dim=1)
    return F.relu(pos - neg + margin).mean()


def crop_boxes(attention: torch.Tensor, mode: str) -> torch.Tensor:
    """Centres ``B x P x 2`` (x, y in [-1, 1], ``grid_sample`` convention) of ``B x P x h x w`` attention
    maps that sum to one over space: their centroids (``soft``) or arg-max positions (``peak``)."""
    b, p, h, w = attention.shape
    ys = (torch.arange(h, device=attention.device, dtype=attention.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=attention.device, dtype=attention.dtype) + 0.5) / w * 2 - 1
    if mode == "soft":
        return torch.stack([(attention.sum(dim=2) * xs).sum(dim=-1),
                            (attention.sum(dim=3) * ys).sum(dim=-1)], dim=-1)
    flat = attention.flatten(2).argmax(dim=2)
    return torch.stack([xs[flat % w], ys[flat // w]], dim=-1)


def zoom_crops(images: torch.Tensor, centres: torch.Tensor, fraction: float, size: int) -> torch.Tensor:
    """``(B * P) x C x size x size``: for every image of ``images`` (``B x C x H x W``) and each of its
    ``P`` centres (``B x P x 2``, ``grid_sample`` convention), the square of side ``fraction`` of the
    image around it, resampled (zeros outside); differentiable in the centres."""
    b, p = centres.shape[:2]
    theta = torch.zeros(b * p, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = fraction
    theta[:, :, 2] = centres.reshape(b * p, 2)
    grid = F.affine_grid(theta, [b * p, images.shape[1], size, size], align_corners=False)
    source = images.repeat_interleave(p, dim=0)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def attention_diversity(attention: torch.Tensor) -> torch.Tensor:
    """Mean cosine overlap between distinct attention maps of an image (``B x P x h x w``; 0 when
    they do not overlap): the term that keeps the parts apart."""
    p = attention.shape[1]
    a = F.normalize(attention.flatten(2), dim=2)
    overlap = a @ a.transpose(1, 2)
    off = overlap.sum(dim=(1, 2)) - overlap.diagonal(dim1=1, dim2=2).sum(dim=1)
    return off.mean() / max(p * (p - 1), 1)


class SGMALocalizer(Localizer):
    """Global + attention-cropped part embeddings, softmax (or attribute softmax) + centre triplet."""

    def __init__(self, backbone: Backbone, num_classes: int, *, parts: int = 2, crop_fraction: float = 0.3,
                 crop: str = "soft", part_size: int | None = None, embed_dim: int = 128,
                 triplet_weight: float = 0.1, margin: float = 0.2, diversity_weight: float = 0.1,
                 attributes: str | Sequence[Sequence[float]] | None = None, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if not 0 < crop_fraction <= 1 or parts < 1:
            raise ValueError(f"need parts >= 1 and 0 < crop_fraction <= 1, got {parts} and {crop_fraction}")
        self.parts, self.crop_fraction, self.crop = int(parts), float(crop_fraction), crop
        self.part_size = part_size
        self.embed_dim, self.margin = int(embed_dim), float(margin)
        self.triplet_weight, self.diversity_weight = float(triplet_weight), float(diversity_weight)
        self.attributes_option = attributes
        c, d = self.channels, self.embed_dim * (1 + self.parts)
        self.attention = nn.Conv2d(c, self.parts, 1)
        self.global_proj, self.part_proj = nn.Linear(c, self.embed_dim), nn.Linear(c, self.embed_dim)
        self.global_head = nn.Linear(c, num_classes)
        self.centres = nn.Parameter(torch.randn(num_classes, d) * 0.1)
        table = self._attribute_table(attributes)
        if table is None:
            self.head = nn.Linear(d, num_classes)
        else:
            if table.shape[0] != num_classes:
                raise ValueError(f"attributes has {table.shape[0]} rows for {num_classes} classes")
            self.register_buffer("attributes", table)
            self.attribute_proj = nn.Sequential(nn.Linear(table.shape[1], 64), nn.ReLU(inplace=True),
                                                nn.Linear(64, d))
            self.logit_scale = nn.Parameter(torch.tensor(10.0))

    @staticmethod
    def _attribute_table(attributes: str | Sequence[Sequence[float]] | None) -> torch.Tensor | None:
        if attributes is None:
            return None
        if attributes == "iscn":
            from holons.data.chromosome_attributes import chromosome_attribute_matrix

            return torch.from_numpy(chromosome_attribute_matrix())
        if isinstance(attributes, str):
            raise ValueError(f"attributes must be 'iscn' or a K x A table, got {attributes!r}")
        return torch.tensor([[float(v) for v in row] for row in attributes])

    def class_vectors(self) -> torch.Tensor:
        """``K x D``: the linear classifier's rows, or the attribute vectors in embedding space (scaled)."""
        if hasattr(self, "head"):
            return self.head.weight
        return self.logit_scale * F.normalize(self.attribute_proj(self.attributes), dim=1)

    def _crops(self, images: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``(B * P) x 1 x S x S`` zoomed crops around each attention map's centre."""
        size = self.part_size or max(16, images.shape[-1] // 2)
        return zoom_crops(images, crop_boxes(attention, self.crop), self.crop_fraction, size)

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        b = feats.shape[0]
        attention = self.attention(feats).flatten(2).softmax(dim=2).view(b, self.parts, *feats.shape[-2:])
        pooled = feats.mean(dim=(2, 3))
        part_feats = self.features(self._crops(images, attention)).mean(dim=(2, 3))
        parts = F.normalize(self.part_proj(part_feats), dim=1).view(b, self.parts * self.embed_dim)
        embedding = torch.cat([F.normalize(self.global_proj(pooled), dim=1), parts], dim=1)
        vectors = self.class_vectors()
        logits = embedding @ vectors.t()
        if hasattr(self, "head"):
            logits = logits + self.head.bias
        return {"feats": feats, "attention": attention, "pooled": pooled, "embedding": embedding,
                "logits": logits, "vectors": vectors}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)["logits"]

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *,
             progress: float) -> tuple[torch.Tensor, LossTerms]:
        out = self._forward(images)
        ce = F.cross_entropy(out["logits"], labels)
        global_ce = F.cross_entropy(self.global_head(out["pooled"]), labels)
        triplet = centre_triplet_loss(out["embedding"], labels, self.centres, self.margin)
        diversity = attention_diversity(out["attention"])
        total = ce + global_ce + self.triplet_weight * triplet + self.diversity_weight * diversity
        return total, {"ce": ce.item(), "global_ce": global_ce.item(), "triplet": triplet.item(),
                       "diversity": diversity.item()}

    def class_maps(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self._forward(images)
        cam = normalize_maps(torch.einsum("bchw,bc->bhw", out["feats"], self.global_head.weight[target]))
        b, e = len(target), self.embed_dim
        share = (out["embedding"] * out["vectors"][target]).view(b, 1 + self.parts, e).sum(dim=2)[:, 1:]
        attended = torch.einsum("bp,bphw->bhw", share.softmax(dim=1), out["attention"])
        return 0.5 * cam + 0.5 * normalize_maps(attended)

    def describe(self) -> dict:
        return {"parts": self.parts, "crop_fraction": self.crop_fraction, "crop": self.crop,
                "part_size": self.part_size, "embed_dim": self.embed_dim,
                "triplet_weight": self.triplet_weight,
                "margin": self.margin, "diversity_weight": self.diversity_weight,
                "attributes": self.attributes_option}
