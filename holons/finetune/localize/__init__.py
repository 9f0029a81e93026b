"""Weakly supervised localization and part discovery: one module per method, a registry, training.

Every method is a :class:`~holons.finetune.localize.base.Localizer` (an ``nn.Module`` on a holons
backbone with its own ``loss`` and a ``localization_map(images) -> N x H x W``):

- ``cam``: global pooling + linear classifier, class activation map (the baseline);
- ``ppl``: progressive patch learning;
- ``sgma``: semantic-guided multi-attention with zoomed part crops;
- ``pdisconet``: part discovery with priors;
- ``genpromp``: a small prompt-conditioned denoiser whose cross-attention is the map.

``train_localizer`` / ``predict_maps`` (``holons.finetune.localize.train``) train and apply them.
"""

from __future__ import annotations

from typing import Any

from holons.errors import ConfigError
from holons.finetune.localize.base import Localizer
from holons.finetune.localize.cam import CAMLocalizer
from holons.finetune.localize.genpromp import GenPrompLocalizer
from holons.finetune.localize.pdisconet import PDiscoNetLocalizer
from holons.finetune.localize.ppl import PPLLocalizer
from holons.finetune.localize.sgma import SGMALocalizer
from holons.ssl.backbone import Backbone

__all__ = ["METHODS", "Localizer", "build_localizer"]

METHODS: dict[str, type[Localizer]] = {
    "cam": CAMLocalizer,
    "ppl": PPLLocalizer,
    "sgma": SGMALocalizer,
    "pdisconet": PDiscoNetLocalizer,
    "genpromp": GenPrompLocalizer,
}


def build_localizer(method: str, backbone: Backbone, num_classes: int, *, feature_stage: int = -1,
                    input_stats: tuple[float, float] | None = None,
                    options: dict[str, Any] | None = None) -> Localizer:
    """The ``method``'s module on ``backbone``; ``options`` are the method's own settings (its
    constructor's keyword arguments); a wrong name or value is a ``ConfigError``."""
    if method not in METHODS:
        raise ConfigError(f"unknown localization method {method!r}; choose from {', '.join(METHODS)}")
    try:
        return METHODS[method](backbone, num_classes, feature_stage=feature_stage, input_stats=input_stats,
                               **(options or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {method}: {e}") from e
