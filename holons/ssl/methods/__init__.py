"""Pretraining methods, one module each; adding a method adds a module and one line to ``METHODS``.

A module builds a :class:`~holons.ssl.methods.base.Method` (name, segments, losses of a step); the
config's ``method`` key picks one by name.
"""

from __future__ import annotations

from holons.errors import ConfigError
from holons.ssl.config import PretrainConfig, Segment
from holons.ssl.methods import adamv2, dino
from holons.ssl.methods.base import LossContext, Losses, Method

METHODS: dict[str, Method] = {m.name: m for m in (adamv2.METHOD, dino.METHOD)}

__all__ = ["METHODS", "LossContext", "Losses", "Method", "get_method", "plan_segments"]


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def plan_segments(cfg: PretrainConfig, steps_per_epoch: int) -> list[Segment]:
    """The run's (stage, level) segments in order, with their global step ranges, as ``cfg.method``
    plans them (``dino``: one localizability stage at level 0 with the curriculum's total steps)."""
    return get_method(cfg.method).segments(cfg, steps_per_epoch)
