"""What a pretraining method is, and the pieces its objectives share.

A method is a module under ``holons/ssl/methods/`` that builds one :class:`Method`: its name, the
segments (stage, level, steps) of its run, and its ``losses`` for one step. The loop
(``holons.ssl.trainer``) hands ``losses`` a :class:`LossContext` (itself): the config, the EMA
teacher, the student (DDP-wrapped when distributed), the localizability loss, input normalization
and autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from holons.anatomy import Views
from holons.ssl.config import PretrainConfig, Segment, curriculum_segments
from holons.ssl.losses import LocalizabilityLoss, LocalizabilityOutput, koleo_loss

Losses = tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]
"""Total loss, its terms (``loss_*``) and diagnostics, and the teacher logits for the centre update."""


class LossContext(Protocol):
    """What an objective reads from the loop."""

    cfg: PretrainConfig
    teacher: nn.Module
    """The EMA teacher: ``backbone`` and ``loc_head``."""
    model: nn.Module
    """The student (``holons.ssl.student.StudentNet``), DDP-wrapped in a distributed run."""
    loc_loss: LocalizabilityLoss

    def normalize(self, x: torch.Tensor) -> torch.Tensor: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def branches(self, mode: str) -> tuple[bool, bool]:
        """(composition, decomposition) active in this stage mode."""
        ...


@dataclass(frozen=True)
class Method:
    """One pretraining method: the registry (``holons.ssl.methods.METHODS``) holds one per module."""

    name: str
    losses: Callable[[LossContext, Views, Segment], Losses]
    segments: Callable[[PretrainConfig, int], list[Segment]] = curriculum_segments
    """The run's (stage, level) segments for a number of steps per epoch (default: the curriculum)."""


def split_views(x: torch.Tensor) -> list[torch.Tensor]:
    """``B x V x K`` -> V tensors ``B x K``."""
    return list(x.unbind(1))


def view_counts(v: Views) -> tuple[int, int, int, bool]:
    """(batch size, global views, local views, whether crops are box-mixed between images by CutMix)."""
    return v.batch_size, v.global_crops.shape[1], v.local_crops.shape[1], (
        v.partner is not None and v.part_swap is None)


def flat_views(ctx: LossContext, x: torch.Tensor) -> torch.Tensor:
    """Normalized crops ``(B, V, C, S, S)`` -> ``(B*V, C, S, S)``."""
    return ctx.normalize(x.flatten(0, 1))


def student_view_logits(s: dict[str, Any], b: int, n_g: int, n_l: int) -> list[torch.Tensor]:
    """The student's localizability logits, one ``B x K`` tensor per view (globals, then locals)."""
    return (split_views(s["logits"]["global"].float().unflatten(0, (b, n_g)))
            + split_views(s["logits"]["local"].float().unflatten(0, (b, n_l))))


def finish(ctx: LossContext, v: Views, s: dict[str, Any], total: torch.Tensor, terms: dict[str, torch.Tensor],
           out: LocalizabilityOutput, teacher_logits: list[torch.Tensor]) -> Losses:
    """Add the optional KoLeo term (``loss.w_koleo``: spread the student's global-crop embeddings
    within the batch) and the teacher diagnostics; the method's :data:`Losses`."""
    cfg = ctx.cfg
    if cfg.loss.w_koleo > 0:
        n_g = v.global_crops.shape[1]
        z = s["proj"]["global"].unflatten(0, (v.batch_size, n_g))
        terms["koleo"] = torch.stack([koleo_loss(z[:, j]) for j in range(n_g)]).mean()
        total = total + cfg.loss.w_koleo * terms["koleo"]
    diag = {"teacher_entropy": out.teacher_entropy, "teacher_batch_entropy": out.teacher_batch_entropy,
            "center_norm": out.center_norm}
    return total, {**{f"loss_{k}": t for k, t in terms.items()}, **diag}, teacher_logits
