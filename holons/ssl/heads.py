"""Projection heads of the three Adam-v2 branches.

- ``LocalizabilityHead``: MLP -> L2-normalize -> weight-normalized linear to K prototypes.
- ``CompositionHead``: k x k part embeddings (raster order) -> embedding of the whole.
- ``DecompositionHead``: embedding of the whole -> k x k part embeddings (raster order).
- ``PatchPredictor``: the student's patch features -> its prediction of the teacher's (informed
  masking, ``holons.ssl.methods.informed_masking``).

Part order is part of the model: index ``i`` of the part axis is grid cell
``(row, col) = divmod(i, k)`` (top-left, top-right, ..., bottom-right). All heads hold plain
tensors only, so their ``state_dict`` loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CompositionHead", "DecompositionHead", "LocalizabilityHead", "PatchPredictor"]


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LocalizabilityHead(nn.Module):
    """Projection to K prototype logits for teacher-student self-distillation.

    MLP ``in_dim -> hidden -> ... -> bottleneck`` (GELU between layers, ``nlayers`` linear layers),
    L2-normalize, then a bias-free linear ``bottleneck -> out_dim`` whose rows are normalized to
    unit length at every forward (weight normalization with the gain fixed at 1). The logits are
    thus cosine similarities to K prototypes, bounded in [-1, 1]; the temperatures do the scaling.

    The last layer is frozen during the first epoch to stabilise early training: either toggle
    ``set_last_layer_trainable`` (single process, or before wrapping in DDP) or call
    ``cancel_last_layer_grad`` after every backward (DDP-safe: parameters keep ``requires_grad``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden: int = 2048,
        bottleneck: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck)]
        else:
            layers = [nn.Linear(in_dim, hidden), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden, hidden), nn.GELU()]
            layers.append(nn.Linear(hidden, bottleneck))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)
        self.apply(_init_linear)
        self.out_dim = out_dim

    def normalized_prototypes(self) -> torch.Tensor:
        """The effective last-layer weight, ``K x bottleneck`` with unit-norm rows."""
        return F.normalize(self.last_layer.weight, dim=1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalized bottleneck embedding (``B x bottleneck``) that the prototypes score."""
        return F.normalize(self.mlp(x), dim=-1)

    def prototype_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine logits of bottleneck embeddings ``z`` (from ``project``) against the K prototypes."""
        return F.linear(z, self.normalized_prototypes())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototype_logits(self.project(x))

    def set_last_layer_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the prototypes through ``requires_grad`` (not under an active DDP wrapper)."""
        self.last_layer.weight.requires_grad_(trainable)

    def cancel_last_layer_grad(self) -> None:
        """Drop the prototypes' gradient after backward; the optimizer then skips them (DDP-safe freeze)."""
        self.last_layer.weight.grad = None


class CompositionHead(nn.Module):
    """Parts -> whole: ``B x k2 x D`` part embeddings -> ``B x D`` L2-normalized whole embedding.

    The k2 part embeddings are concatenated in raster order (so the layer knows where each part
    sits), then ``Linear(k2*D, D) -> ReLU -> Linear(D, D)``, then L2-normalized.
    """

    def __init__(self, embed_dim: int, k2: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.k2 = k2
        self.mlp = nn.Sequential(
            nn.Linear(k2 * embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim)
        )
        self.apply(_init_linear)

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        if parts.ndim != 3 or parts.shape[1] != self.k2 or parts.shape[2] != self.embed_dim:
            raise ValueError(
                f"CompositionHead expects B x {self.k2} x {self.embed_dim} parts, got {tuple(parts.shape)}"
            )
        return F.normalize(self.mlp(parts.flatten(1)), dim=-1)


class DecompositionHead(nn.Module):
    """Whole -> parts: ``B x D`` whole embedding -> ``B x k2 x D`` part embeddings (raster order).

    ``Linear(D, D) -> ReLU -> Linear(D, k2*D)``, split into k2 chunks; chunk ``i`` predicts part ``i``.

    ``normalize="per_chunk"`` (default) L2-normalizes each chunk, matching the unit-norm targets.
    ``normalize="joint"`` normalizes the whole ``k2*D`` vector before splitting (the released
    Adam-v2 variant): the chunks' squared norms then sum to 1, so their RMS norm is exactly 1/k
    and the squared error against unit-norm targets can never reach zero: even with every chunk
    pointing at its target it is ``mean_i (1 - |chunk_i|)^2 >= (1 - 1/k)^2`` per part.
    """

    def __init__(
        self, embed_dim: int, k2: int, normalize: Literal["per_chunk", "joint"] = "per_chunk"
    ) -> None:
        super().__init__()
        if normalize not in ("per_chunk", "joint"):
            raise ValueError(f"normalize must be 'per_chunk' or 'joint', got {normalize!r}")
        self.embed_dim = embed_dim
        self.k2 = k2
        self.normalize = normalize
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, k2 * embed_dim)
        )
        self.apply(_init_linear)

    def forward(self, whole: torch.Tensor) -> torch.Tensor:
        if whole.ndim != 2 or whole.shape[1] != self.embed_dim:
            raise ValueError(f"DecompositionHead expects B x {self.embed_dim}, got {tuple(whole.shape)}")
        out = self.mlp(whole)
        if self.normalize == "joint":
            return F.normalize(out, dim=-1).unflatten(1, (self.k2, self.embed_dim))
        return F.normalize(out.unflatten(1, (self.k2, self.embed_dim)), dim=-1)


class PatchPredictor(nn.Module):
    """Patch features ``B x N x C`` -> predicted teacher patch features ``B x N x C``, patch by patch:
    ``LayerNorm -> Linear(C, hidden) -> GELU -> Linear(hidden, C)``. The context of a masked patch
    comes from the backbone (its receptive field or attention), not from this head."""

    def __init__(self, channels: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.GELU(),
                                 nn.Linear(hidden, channels))
        self.apply(_init_linear)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(patches)
