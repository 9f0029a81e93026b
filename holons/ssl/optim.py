"""Optimizer helpers: AdamW parameter groups without decay on 1-D tensors, per-tensor clipping, setters.

Biases and normalization scales/shifts are 1-D; decaying them towards zero only hurts, so they
go to a group flagged ``no_weight_decay`` whose decay stays 0 whatever the schedule says.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["clip_gradients_per_tensor", "param_groups", "set_lr", "set_weight_decay"]

NO_DECAY_KEY = "no_weight_decay"


def _modules(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def param_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups over all parameters of ``modules`` (shared parameters counted once).

    Parameters with ``ndim <= 1`` or named ``*.bias`` get no weight decay. Parameters that are
    currently frozen (``requires_grad=False``, e.g. the localizability prototypes in the first
    epoch) are included: the optimizer skips them while their gradient is ``None``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in _modules(modules):
        for name, param in module.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, NO_DECAY_KEY: False},
        {"params": no_decay, "weight_decay": 0.0, NO_DECAY_KEY: True},
    ]
    return [g for g in groups if g["params"]]


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the decay of every group except those flagged ``no_weight_decay`` (kept at 0)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0 if group.get(NO_DECAY_KEY, False) else weight_decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every group (times the group's ``lr_scale`` when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@torch.no_grad()
def clip_gradients_per_tensor(
    modules: nn.Module | Iterable[nn.Module], max_norm: float = 3.0
) -> torch.Tensor:
    """Clip each parameter's gradient to L2 norm ``max_norm`` on its own; return the norms before clipping.

    Unlike a global-norm clip, one exploding tensor cannot shrink the updates of all others.
    With a GradScaler, unscale the gradients first. Runs without host synchronization.
    """
    params = {id(p): p for m in _modules(modules) for p in m.parameters() if p.grad is not None}
    grads = [p.grad for p in params.values()]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return torch.stack(norms)
