"""Random draws from an explicit ``torch.Generator``, delivered on the tensors' device.

Small parameter tensors (boxes, angles, probabilities) are drawn on the generator's device and
moved, so the same seed gives the same views on CPU and on an accelerator, and a CPU run is
bit-exact reproducible (the trainer's resume test relies on it).
"""

from __future__ import annotations

import torch


def generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """float32 U(low, high) of ``shape`` drawn with ``generator``, returned on ``device``."""
    u = torch.rand(shape, generator=generator, device=generator_device(generator), dtype=torch.float32)
    if low != 0.0 or high != 1.0:
        u = low + (high - low) * u
    return u.to(device)


def log_uniform(u: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """Map U(0, 1) draws ``u`` to a log-uniform value in [low, high] (for aspect ratios and scales)."""
    lo = torch.log(torch.as_tensor(low, dtype=u.dtype, device=u.device))
    hi = torch.log(torch.as_tensor(high, dtype=u.dtype, device=u.device))
    return torch.exp(lo + (hi - lo) * u)


def permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator_device(generator)).to(device)
