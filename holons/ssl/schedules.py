"""Per-step schedules (arrays indexed by optimizer step) for lr, weight decay and EMA momentum.

Precomputed arrays make a resumed run read exactly the value an uninterrupted run would use
at the same step.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "cosine_schedule",
    "lr_schedule",
    "momentum_schedule",
    "scaled_lr",
    "weight_decay_schedule",
]


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """``total_steps`` values: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``.

    The warm-up takes ``warmup_steps`` steps and stops one step short of ``base``; the cosine
    part starts exactly at ``base`` and ends exactly at ``final`` on the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = warmup_start + (base - warmup_start) * np.arange(warmup_steps, dtype=np.float64) / max(
        warmup_steps, 1
    )
    n = total_steps - warmup_steps
    if n == 0:
        return warmup
    if n == 1:
        return np.concatenate([warmup, [float(final)]])
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * np.arange(n, dtype=np.float64) / (n - 1)))
    cosine[-1] = final
    return np.concatenate([warmup, cosine])


def scaled_lr(base: float, global_batch: int) -> float:
    """Linear scaling rule: ``base * global_batch / 256``."""
    return base * global_batch / 256.0


def lr_schedule(
    peak: float, total_steps: int, warmup_steps: int, final: float = 1e-6, warmup_start: float = 0.0
) -> np.ndarray:
    """Learning rate: linear warm-up to ``peak`` (e.g. ``scaled_lr(5e-4, batch)``), cosine to ``final``."""
    return cosine_schedule(peak, final, total_steps, warmup_steps, warmup_start)


def weight_decay_schedule(total_steps: int, base: float = 0.04, final: float = 0.4) -> np.ndarray:
    """Weight decay rising on a cosine from ``base`` to ``final``."""
    return cosine_schedule(base, final, total_steps)


def momentum_schedule(total_steps: int, base: float = 0.996, final: float = 1.0) -> np.ndarray:
    """EMA momentum on a cosine from ``base`` to exactly ``final`` (1: frozen teacher) at the last step."""
    return cosine_schedule(base, final, total_steps)
