"""Fine-tuning: classifiers and segmenters for radiographs (``classifier``, ``segmenter``, applied by
``prediction``), and chromosome karyotyping (``karyotype``).

The package is the API ``holons.finetune``: ``classify(config, *, data, out, overrides, resume,
overwrite)`` and ``segment(...)`` train from an exported foundation, a timm name or random weights
and return a result with the model folder; ``predict(model, images, out=...)`` applies one. They
load lazily, so importing the package stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_API = {
    "classify": ("holons.finetune.classifier", "finetune_classify"),
    "segment": ("holons.finetune.segmenter", "finetune_segment"),
    "predict": ("holons.finetune.prediction", "predict"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'holons.finetune' has no attribute {name!r}")
