"""Settings of ``holons finetune classify | segment``: dataclass defaults < YAML < ``key=value`` overrides.

The shipped defaults are ``configs/finetune/classify_default.yaml`` and ``segment_default.yaml``;
every key is documented on the fields below (an unknown key is named in the error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from holons.data.preprocess import Preprocessing
from holons.errors import ConfigError

__all__ = ["FinetuneConfig", "ClassifyConfig", "SegmentConfig"]

MODES = ("finetune", "frozen")
T = TypeVar("T", bound="FinetuneConfig")


@dataclass
class FinetuneConfig:
    """Settings shared by both tasks.

    - ``init``: an exported foundation folder, a timm model name (random weights: nothing is
      downloaded), or ``random`` (then ``arch`` names the model);
    - ``arch``: the timm model for ``init: random``;
    - ``size``: the network input side; ``preprocessing``: the full contract (``size``, ``resize``,
      ``voi``, ``intensity``; ``holons.data.preprocess``); default: the foundation's, at ``size``;
    - ``mode``: ``finetune`` (encoder and head trained) or ``frozen`` (head / decoder only);
    - ``label_fraction``: share of the training images used (seeded); ``shots``: exactly this many
      labelled training images (few-shot; overrides ``label_fraction``);
    - ``val_fraction``: share held out for validation when the data has no train / val split;
    - ``steps``, ``batch_size``, ``lr`` (head / decoder), ``encoder_lr`` (``finetune`` mode),
      ``seed``, ``device`` (auto, cpu, cuda, cuda:1...).
    """

    init: str = "random"
    arch: str | None = "convnext_atto"
    size: int | None = 64
    preprocessing: dict[str, Any] | None = None
    mode: Literal["finetune", "frozen"] = "finetune"
    label_fraction: float = 1.0
    shots: int | None = None
    val_fraction: float = 0.2
    steps: int = 60
    batch_size: int = 8
    lr: float = 3e-3
    encoder_lr: float = 1e-4
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label_fraction must be within (0, 1], got {self.label_fraction}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be at least 1, got {self.shots}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be within [0, 1), got {self.val_fraction}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be at least 1, got {self.steps}, {self.batch_size}")
        if self.preprocessing is not None:
            Preprocessing.from_dict(self.preprocessing)  # names a bad key or value now, not after training


@dataclass
class ClassifyConfig(FinetuneConfig):
    """``holons finetune classify``: one linear head (per task) on the pooled embedding; the classes
    come from the data (``holons.data.labelled``)."""

    lr: float = 1e-3


@dataclass
class SegmentConfig(FinetuneConfig):
    """``holons finetune segment``: a U-Net-style decoder (``holons.finetune.heads``); the structures
    come from the data (``holons.data.annotated``).

    - ``width`` / ``image_width``: decoder channels at the backbone's scales / at the finer scales fed
      by the input image (0: no image skips);
    - ``group_decoders``: left and right of a pair (lungs, clavicles) share a decoder, every other
      structure has its own (False: one decoder for all);
    - ``bce_weight`` / ``balance_bce``: the (class-balanced) BCE term next to the soft Dice;
    - ``augment``: small random affine of image and masks; ``threshold``: probability of a mask pixel.
    """

    width: int = 16
    image_width: int = 16
    group_decoders: bool = True
    bce_weight: float = 1.0
    balance_bce: bool = True
    augment: bool = True
    threshold: float = 0.5


