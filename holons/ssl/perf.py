"""Throughput knobs of the pretraining step (config ``perf``; ``holons.ssl.config.PerfConfig`` says what
each does and its default).

The module wrappers here replace a module's ``forward`` on the instance (``module.forward = wrapper``)
rather than wrapping the module, so parameter names, state dicts, checkpoints, exports and the EMA
teacher's name matching stay exactly as they are, whichever knobs are on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from holons.ssl.config import PerfConfig

__all__ = ["CompileFallback", "adamw_options", "apply_channels_last", "channels_last_input",
           "compile_forwards", "teacher_inference_forwards", "to_unit_interval"]

log = logging.getLogger("holons.pretrain")


def adamw_options(choice: str) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments of ``perf.adamw`` (``default``: torch picks)."""
    return {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[choice]


def apply_channels_last(*modules: nn.Module) -> None:
    """Store the 4-D weights of ``modules`` in NHWC (``torch.channels_last``), in place."""
    for m in modules:
        m.to(memory_format=torch.channels_last)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """An image stack ``N x C x H x W`` in NHWC (other ranks unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def to_unit_interval(images: torch.Tensor, max_value: float) -> torch.Tensor:
    """Stored integers (uint8 / uint16) -> float32 in [0, 1] on their device; floats pass through.

    The same IEEE float32 division the datasets do on the host, so the result is bit-identical.
    """
    if images.is_floating_point():
        return images
    return images.float().div_(max_value)


def _is_compile_error(exc: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo tracing, a backend, inductor's compiler)."""
    from torch._dynamo.exc import TorchDynamoException

    if isinstance(exc, TorchDynamoException):
        return True
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


class CompileFallback:
    """Compiled forwards of several modules that fall back together: the first compile error logs one
    warning and every wrapped module runs its eager forward from then on."""

    def __init__(self, backend: str, mode: str | None) -> None:
        self.backend, self.mode = backend, mode
        self.failed: BaseException | None = None

    def wrap(self, module: nn.Module) -> None:
        eager = module.forward
        compiled = torch.compile(eager, backend=self.backend, mode=self.mode)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.failed is None:
                try:
                    return compiled(*args, **kwargs)
                except Exception as e:
                    if not _is_compile_error(e):
                        raise
                    self.fall_back(e)
            return eager(*args, **kwargs)

        module.forward = forward

    def fall_back(self, exc: BaseException) -> None:
        """Log one warning; every wrapped forward runs eagerly from now on."""
        self.failed = exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("perf.compile: torch.compile (backend %s) failed, continuing uncompiled: %s",
                    self.backend, first[:300])


def compile_forwards(modules: Iterable[nn.Module], perf: PerfConfig) -> CompileFallback:
    """``torch.compile`` the forwards of ``modules`` (one fallback for all of them)."""
    fallback = CompileFallback(perf.compile_backend, perf.compile_mode)
    for m in modules:
        fallback.wrap(m)
    return fallback


def _normal_tensor(x: Any) -> Any:
    # an inference tensor cloned outside inference mode is a normal one: losses may save it for backward
    return x.clone() if isinstance(x, torch.Tensor) else x


def teacher_inference_forwards(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Run the forwards of ``modules`` (the teacher's) under ``torch.inference_mode``, in bf16 autocast
    on CUDA; their outputs come back as normal tensors."""
    for m in modules:
        eager = m.forward

        def forward(*args: Any, _eager: Callable = eager, **kwargs: Any) -> Any:
            with torch.inference_mode():
                if device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = _eager(*args, **kwargs)
                else:
                    out = _eager(*args, **kwargs)
            return tree_map(_normal_tensor, out)

        m.forward = forward
