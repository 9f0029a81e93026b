"""EMA teacher: a gradient-free copy of the student that follows it by exponential moving average.

The teacher runs in eval mode: batch-norm layers use running statistics (copied from the
student at every update, so they track the student's data statistics) rather than the
statistics of whichever views the teacher happens to see, and stochastic depth / dropout are
off, which makes teacher targets deterministic for a given input.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_teacher", "unwrap_model", "update_teacher"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel / ``torch.compile`` wrapper (or the module itself)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the student with ``requires_grad=False`` everywhere, in eval mode.

    Keep the teacher out of any parent module whose ``.train()`` is called, or call
    ``teacher.eval()`` again after it.
    """
    teacher = copy.deepcopy(unwrap_model(student))
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In place: ``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter; buffers copied.

    Parameters are matched by name, so a mismatch between the two architectures is an error
    rather than a silent misalignment. ``momentum=1`` leaves the parameters unchanged.
    """
    student = unwrap_model(student)
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        raise ValueError(
            "student and teacher parameters differ; build the teacher with make_teacher(student)"
        )
    names = list(t_params)
    t_list = [t_params[n].data for n in names]
    s_list = [s_params[n].data.to(t_params[n].dtype) for n in names]
    if t_list:
        torch._foreach_mul_(t_list, momentum)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)

    s_buffers = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        if name not in s_buffers:
            raise ValueError(f"student has no buffer {name!r}; build the teacher with make_teacher(student)")
        buf.copy_(s_buffers[name])
