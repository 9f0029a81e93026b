"""Losses of the three Adam-v2 branches.

Localizability is teacher -> student cross-entropy over K prototypes with a centred, sharpened
teacher (DESIGN.md "Localizability"). Composability and decomposability are squared errors
between L2-normalized embeddings (DESIGN.md "Composability", "Decomposability").

Reduction of the embedding losses: for unit vectors ``|p - t|^2 = 2 - 2cos``. Averaging that
over the D dimensions (``reduction="mean"``, plain MSE) gives ``(2 - 2cos)/D``, about three
orders of magnitude below the localizability cross-entropy (which starts near ``log K``), so the
two branches would barely train at equal loss weights. The default ``reduction="sum_dim"`` sums
over D and averages over the batch (and parts): the loss is ``mean(2 - 2cos)`` in [0, 4], on the
same scale as the cross-entropy, and equal loss weights give comparable gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LocalizabilityLoss",
    "LocalizabilityOutput",
    "composition_loss",
    "decomposition_loss",
    "koleo_loss",
    "mix_teacher_probs",
    "sinkhorn_knopp_probs",
    "view_pairs",
]

Views = Sequence[torch.Tensor] | torch.Tensor
Reduction = Literal["sum_dim", "mean"]
Centering = Literal["center", "sinkhorn"]


class LocalizabilityOutput(NamedTuple):
    """Loss and collapse-watch diagnostics (all tensors; diagnostics carry no gradient).

    ``teacher_entropy``: mean entropy of the teacher distributions (falls towards 0 on one-hot
    collapse). ``teacher_batch_entropy``: entropy of the batch-mean teacher distribution (falls
    when all samples pick the same prototypes). ``center_norm``: L2 norm of the centre.
    """

    loss: torch.Tensor
    teacher_entropy: torch.Tensor
    teacher_batch_entropy: torch.Tensor
    center_norm: torch.Tensor


def view_pairs(
    n_student: int,
    n_teacher: int,
    *,
    exclude_same_view: bool = False,
    targets: Sequence[int | Sequence[int]] | None = None,
) -> list[tuple[int, int]]:
    """(student view, teacher view) pairs that enter the loss.

    Default: every student view against every teacher view. ``exclude_same_view`` drops pairs
    ``(i, i)``: in multi-crop the first ``n_teacher`` student views are the teacher's own views.
    ``targets[i]`` gives the teacher view(s) that student view ``i`` predicts (part-whole stage:
    global and nested local crops -> the whole W, a part-local crop -> its part, or both).
    """
    if targets is not None:
        if len(targets) != n_student:
            raise ValueError(f"targets has {len(targets)} entries for {n_student} student views")
        pairs = []
        for s, tgt in enumerate(targets):
            for t in tgt if isinstance(tgt, Sequence) else [tgt]:
                if not 0 <= t < n_teacher:
                    raise ValueError(f"student view {s} targets teacher view {t}, but there are {n_teacher}")
                pairs.append((s, int(t)))
        return pairs
    return [(s, t) for s in range(n_student) for t in range(n_teacher) if not (exclude_same_view and s == t)]


def mix_teacher_probs(probs: torch.Tensor, partner: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Target of a CutMix view: ``lam * p(A) + (1 - lam) * p(B)`` with B = ``probs[partner]``.

    ``probs`` is ``B x K`` (teacher probabilities of the unmixed images), ``partner`` the index of
    each sample's box donor, ``lam`` a scalar or one value per sample (the clipped-area fraction
    kept from A). The result is a convex combination, so it is again a distribution.
    """
    lam = torch.as_tensor(lam, dtype=probs.dtype, device=probs.device)
    if lam.ndim == 1:
        lam = lam[:, None]
    return lam * probs + (1.0 - lam) * probs[partner]


def _as_views(x: Views) -> list[torch.Tensor]:
    """Views as a list of ``B x K`` tensors (from a list, a ``V x B x K`` tensor or one ``B x K`` view)."""
    if isinstance(x, torch.Tensor):
        if x.ndim not in (2, 3):
            raise ValueError(f"expected B x K or V x B x K outputs, got shape {tuple(x.shape)}")
        return [x] if x.ndim == 2 else list(x.unbind(0))
    return list(x)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _logsumexp_over_batch(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_b exp(log_q[:, b])`` of a ``K x B`` tensor, over the global batch when distributed.

    The maximum is subtracted before ``exp`` (after a MAX all-reduce), so nothing overflows.
    """
    peak = log_q.amax(dim=1, keepdim=True)
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(log_q - peak).sum(dim=1, keepdim=True)
    if _distributed():
        dist.all_reduce(total)
    return torch.log(total) + peak


@torch.no_grad()
def sinkhorn_knopp_probs(teacher_out: torch.Tensor, teacher_temp: float, n_iters: int = 3) -> torch.Tensor:
    """Teacher targets of ``B x K`` logits that equipartition the K prototypes over the batch.

    Sinkhorn-Knopp (SwAV, DINOv2's "SK" teacher) on ``Q = exp(t / teacher_temp)``: ``n_iters``
    rounds of scaling every prototype's total mass over the batch to ``1 / K`` and then every
    sample's mass to ``1 / B``; the result is ``B Q`` transposed back, so each row sums to 1.
    Unlike subtracting a centre, this removes any component that all samples share, so
    near-identical inputs cannot all get the same target. The scaling is done on ``log Q`` in
    float32 with max-subtracted log-sum-exps: a sharp temperature cannot overflow ``exp`` or
    underflow a prototype's whole column to zero. When distributed, the batch is the global one
    (prototype masses and the sample count are summed over ranks).
    """
    log_q = (teacher_out.detach().float() / teacher_temp).t()  # K x B
    n_samples = log_q.new_tensor(float(log_q.shape[1]))
    if _distributed():
        dist.all_reduce(n_samples)
    log_k, log_b = math.log(log_q.shape[0]), torch.log(n_samples)
    for _ in range(n_iters):
        log_q = log_q - _logsumexp_over_batch(log_q) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    return torch.exp(log_q + log_b).t()


class LocalizabilityLoss(nn.Module):
    """Cross-entropy from a centred, sharpened teacher to the student over ``out_dim`` prototypes.

    Teacher: ``softmax((t - c) / teacher_temp)`` (``centering="center"``, DESIGN.md) or the
    Sinkhorn-Knopp targets of ``sinkhorn_knopp_probs`` (``centering="sinkhorn"``, an
    anti-collapse option for near-identical images); student: ``log_softmax(s / student_temp)``.
    The loss is the mean over (student view, teacher view) pairs of the batch-mean
    cross-entropy. The centre ``c`` (a buffer, saved with the state dict) is updated by
    ``update_center`` after the loss, from the raw teacher logits (with Sinkhorn-Knopp it is
    kept for the ``center_norm`` diagnostic only). Computation is in float32
    whatever the autocast dtype (a 0.04 temperature is too sharp for half precision).
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Centering = "center",
        sinkhorn_iters: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        self.out_dim = out_dim
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iters = sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float | None = None) -> torch.Tensor:
        """Sharpened teacher distribution of ``B x K`` logits (no gradient), centred or Sinkhorn-Knopp."""
        temp = self.teacher_temp if teacher_temp is None else teacher_temp
        if self.centering == "sinkhorn":
            return sinkhorn_knopp_probs(teacher_out, temp, self.sinkhorn_iters)
        return F.softmax((teacher_out.detach().float() - self.center) / temp, dim=-1)

    def forward(
        self,
        student_out: Views,
        teacher_out: Views | None = None,
        *,
        teacher_probs: Views | None = None,
        pairs: Sequence[tuple[int, int]] | None = None,
        exclude_same_view: bool = False,
        teacher_temp: float | None = None,
    ) -> LocalizabilityOutput:
        """Loss over views; each view is ``B x K`` (a list of views, a ``V x B x K`` tensor, or one view).

        Give either ``teacher_out`` (raw teacher logits, centred and sharpened here) or
        ``teacher_probs`` (ready-made targets, e.g. CutMix mixtures from ``mix_teacher_probs``).
        ``pairs`` (from ``view_pairs``) overrides the all-pairs default; ``exclude_same_view``
        applies to the default only.
        """
        if (teacher_out is None) == (teacher_probs is None):
            raise ValueError("give exactly one of teacher_out and teacher_probs")
        students = _as_views(student_out)
        if teacher_probs is not None:
            targets = [p.detach().float() for p in _as_views(teacher_probs)]
        else:
            targets = [self.teacher_probs(t, teacher_temp) for t in _as_views(teacher_out)]
        if pairs is None:
            pairs = view_pairs(len(students), len(targets), exclude_same_view=exclude_same_view)
        if not pairs:
            raise ValueError("no (student, teacher) view pairs to compare")

        log_probs: dict[int, torch.Tensor] = {}
        total = students[0].new_zeros((), dtype=torch.float32)
        for s, t in pairs:
            if s not in log_probs:
                log_probs[s] = F.log_softmax(students[s].float() / self.student_temp, dim=-1)
            total = total + torch.sum(-targets[t] * log_probs[s], dim=-1).mean()
        loss = total / len(pairs)

        with torch.no_grad():
            stacked = torch.cat(targets)
            entropy = _entropy(stacked).mean()
            batch_entropy = _entropy(stacked.mean(0))
            center_norm = self.center.norm()
        return LocalizabilityOutput(loss, entropy, batch_entropy, center_norm)

    @torch.no_grad()
    def update_center(self, teacher_out: Views) -> None:
        """``c <- m c + (1 - m) mean(t)`` over all teacher views and, when distributed, all ranks.

        The sum and the row count are all-reduced together, so ranks with unequal batches still
        give the exact global mean.
        """
        logits = torch.cat([t.detach().float() for t in _as_views(teacher_out)])
        stats = torch.cat([logits.sum(0), logits.new_tensor([logits.shape[0]])])
        if _distributed():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def koleo_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko spreading term of ``B x d`` embeddings (DINOv2's KoLeo regulariser).

    ``-mean_i log(min_{j != i} |z_i - z_j|)`` over the L2-normalized rows of this process's batch:
    it grows without bound as two samples' embeddings meet, so minimising it pushes every sample
    away from its nearest neighbour. An anti-collapse option for homogeneous archives, where the
    pooled embeddings of different images are nearly parallel (``loss.w_koleo``; 0 = off).
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"koleo_loss needs a B x d batch with B >= 2, got {tuple(z.shape)}")
    z = F.normalize(z.float(), dim=-1)
    with torch.no_grad():
        sim = z @ z.t()
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    dist_nn = (z - z[nearest]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{what}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )


def _sq_error(pred: torch.Tensor, target: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Squared error of ``pred`` against the L2-normalized, gradient-free ``target``, reduced."""
    sq = (pred.float() - F.normalize(target.detach().float(), dim=-1)).pow(2)
    if reduction == "sum_dim":
        return sq.sum(-1).mean()
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"reduction must be 'sum_dim' or 'mean', got {reduction!r}")


def composition_loss(
    pred: torch.Tensor, target: torch.Tensor, reduction: Reduction = "sum_dim"
) -> torch.Tensor:
    """Squared error between the composed ``B x D`` embedding and the teacher's embedding of W.

    Both sides are L2-normalized here (idempotent for head outputs); the target gets no gradient.
    ``sum_dim``: mean over the batch of ``2 - 2cos`` (default); ``mean``: plain MSE over all elements.
    """
    _check_pair(pred, target, "composition_loss")
    return _sq_error(F.normalize(pred.float(), dim=-1), target, reduction)


def decomposition_loss(
    pred_chunks: torch.Tensor, target_parts: torch.Tensor, reduction: Reduction = "sum_dim"
) -> torch.Tensor:
    """Squared error between ``B x k2 x D`` predicted parts and the teacher's part embeddings.

    Chunk ``i`` is compared with part ``i`` (raster order). The prediction is used as given (so
    the joint-normalization variant keeps its chunk norms); targets are L2-normalized without
    gradient. ``sum_dim``: mean over batch and parts of the squared distance; ``mean``: plain MSE.
    """
    _check_pair(pred_chunks, target_parts, "decomposition_loss")
    if pred_chunks.ndim != 3:
        raise ValueError(f"decomposition_loss expects B x k2 x D tensors, got {tuple(pred_chunks.shape)}")
    return _sq_error(pred_chunks, target_parts, reduction)
