"""The one device rule of every trainer, evaluation and prediction."""

from __future__ import annotations

import torch

from holons.errors import HolonsError


def resolve_device(name: str | torch.device | None = "auto", *,
                   local_rank: int | None = None) -> torch.device:
    """``None`` or "auto": CUDA when available, else the CPU; otherwise the named device
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...).

    ``local_rank`` (distributed runs): a plain ``cuda`` becomes ``cuda:<local_rank mod GPUs>``.
    An unknown name, or CUDA asked for where there is none, is a HolonsError.
    """
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise HolonsError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HolonsError(f"device {name!r} requested but no CUDA device is available")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device
