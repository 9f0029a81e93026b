"""Typed configuration of a distillation run (defaults < YAML < ``key.sub=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from holons.errors import ConfigError

DataKind = Literal["auto", "karyotype", "classification"]
Method = Literal["dm", "gm", "mtt"]
Init = Literal["real", "kmeans", "noise"]


@dataclass
class DistillDataConfig:
    """The real set and how its images become ``size x size`` inputs.

    ``kind``: ``karyotype`` (a chromosome manifest: pki-3, karyonet or ``holons synth karyotypes``;
    24 types; crops cut, centred on the canvas and resized exactly as ``holons karyotype train``
    does, split by slide with karyotyping's fixed split: ``test_fraction``, ``val_fraction``,
    ``split_seed`` have its defaults), ``classification`` (an ``image_table.csv`` set: phantoms'
    ``nodule`` or JSRT's ``has_nodule`` unless ``label`` names another column; or a ``path,label``
    CSV), ``auto``: decided from the data. ``stain`` and ``canvas`` as in karyotyping.
    ``max_train_cases`` (karyotype; 0: all) keeps a seeded subset of the training cells, for CPU
    runs; the test split stays whole. ``eval_split``: what the evaluation scores, ``test`` or ``val``
    (karyotyping's validation cells; for an ``image_table.csv`` set its ``val`` rows), so options can be
    chosen without looking at the test split. Radiographs go through the one preprocessing contract
    (``holons.data.preprocess.Preprocessing``: ``resize``, ``voi``).
    """

    kind: DataKind = "auto"
    size: int = 32
    stain: str = "auto"
    canvas: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    split_seed: int = 0
    max_train_cases: int = 0
    eval_split: Literal["test", "val"] = "test"
    label: str = ""
    resize: str = "letterbox"
    voi: str = "window"

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 8:
            raise ConfigError(f"data.size must be a multiple of 8 and >= 16, got {self.size}")


@dataclass
class DistillNetConfig:
    """The ConvNet-3 (conv 3x3 - instance norm - ReLU - average pool 2, ``depth`` times, ``width``
    channels) used both to match and to evaluate."""

    width: int = 128
    depth: int = 3

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ConfigError("net.width and net.depth must be >= 1")


@dataclass
class DistillMatchConfig:
    """How the synthetic set is learned.

    ``method``: ``dm`` (distribution matching: per class, the mean embedding of a real batch and of
    the class's synthetic images under a freshly initialised ConvNet, every iteration), ``gm``
    (gradient matching: the cross-entropy gradients of the real and synthetic batch under a fresh
    ConvNet that is trained on real data for ``gm_inner_steps`` between matchings) or ``mtt``
    (trajectory matching, :mod:`~holons.finetune.distill.trajectory`: ``mtt_syn_steps`` SGD steps on
    batches of ``mtt_batch`` synthetic images (0: all) from an expert's parameters at a random epoch
    below ``mtt_max_start`` should reach the expert ``mtt_span`` epochs later; the step size is
    learned too, from ``experts.lr``, by SGD at ``mtt_lr_lr``; the experts: the ``experts`` section).
    On pki-3's *validation* split (32 px, 10 per type, k-means start, 2 experts of 5 epochs, 3
    evaluation seeds) no setting tried gave a set better than its start (0.473 +- 0.042): image ``lr``
    1: 0.485 +- 0.015 (the images hardly move), 10: 0.351, 100: 0.221, 1000: 0.191 (batches of 48);
    all images per step at ``lr`` 10: 0.454; experts at ``lr`` 0.05 for 8 epochs, ``lr`` 3: 0.458.
    ``ipc``:
    synthetic images per class; ``init``: ``real`` (random real images of the class, seeded),
    ``kmeans`` (the real images nearest the centres of ``ipc`` k-means clusters of the class's images in
    pixel space: one typical image of each mode of the class instead of a random draw that repeats some
    modes and misses others; see :func:`~holons.finetune.distill.api.kmeans_representatives`) or
    ``noise``. ``keep_background`` (default on): pixels that are empty (exactly 0) in the starting image
    stay 0, so the matching changes the object and not the empty canvas around it (a karyotype canvas
    is a chromosome on an empty background, a letterboxed radiograph has empty bars; a noise start has
    no empty pixel). Unconstrained, DM painted faint texture there that no real image has: on pki-3
    (10 per type, k-means start, 3 seeds) keeping it empty raised test accuracy from 0.440 to 0.469
    (docs/results.md). ``fyi``: FYI's flip (see :mod:`~holons.finetune.distill.matching`). ``augment``:
    siamese augmentation, the real and synthetic images of a class moved by one random pose per
    iteration (the evaluation's shift and scale, and its mirror policy). ``iterations``
    optimizer steps on the images (SGD, ``lr``, momentum 0.5); ``real_batch`` real images per class
    and iteration; a checkpoint every ``checkpoint_every`` iterations (and at the end).

    ``lr`` 0.1 for images in [0, 1]: DM's 1.0 is for images normalised to unit variance; on pki-3's
    training chromosomes (32 px, 24 types, ipc 10) it drove the matching loss up (20 -> 84 in 300
    iterations) and the distilled set to 24 % validation accuracy, against 45 % at 0.1 (docs/results.md).
    """

    method: Method = "dm"
    ipc: int = 10
    init: Init = "real"
    keep_background: bool = True
    fyi: bool = False
    augment: bool = False
    iterations: int = 1000
    lr: float = 0.1
    real_batch: int = 64
    gm_inner_steps: int = 5
    mtt_syn_steps: int = 10
    mtt_span: int = 2
    mtt_max_start: int = 3
    mtt_batch: int = 0
    mtt_lr_lr: float = 1e-5
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ipc < 1 or self.iterations < 0 or self.real_batch < 1 or self.checkpoint_every < 1:
            raise ConfigError("match.ipc, match.real_batch and match.checkpoint_every must be >= 1, "
                              "match.iterations >= 0")
        if self.mtt_syn_steps < 1 or self.mtt_span < 1 or self.mtt_max_start < 1 or self.mtt_batch < 0:
            raise ConfigError("match.mtt_syn_steps, match.mtt_span and match.mtt_max_start must be >= 1, "
                              "match.mtt_batch >= 0")


@dataclass
class DistillExpertConfig:
    """The expert trajectories trajectory matching (``match.method=mtt``) imitates: ``count``
    ConvNets (seeded from ``match.seed``) trained on all training images for ``epochs`` epochs with
    plain SGD (``lr``, batch ``batch_size``) and the evaluation's augmentation, parameters kept after
    every epoch; written once to ``experts.pt`` in the run folder (a resumed run reads them)."""

    count: int = 2
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.count < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("experts.count, experts.epochs and experts.batch_size must be >= 1, "
                              "experts.lr > 0")


@dataclass
class DistillEvalConfig:
    """The evaluation after distilling: a fresh ConvNet trained (``steps`` SGD steps, batch
    ``batch_size``, ``lr`` with momentum 0.9, halved learning rate for the second half) on each arm
    and tested on the held-out split, once per seed; mean +- sd over seeds.

    ``arms``: ``distilled``, ``random`` (the same number of random real images per class, drawn per
    seed) and ``full`` (all training images). ``hflip``: mirror training images with p = 1/2
    (``auto``: on for chromosomes, whose type a mirror keeps; off for radiographs, which have
    laterality). Empty ``seeds``: no evaluation.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["distilled", "random"])
    steps: int = 300
    batch_size: int = 256
    lr: float = 0.01
    hflip: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.arms) - {"distilled", "random", "full"}
        if unknown:
            raise ConfigError(f"evaluate.arms: unknown {sorted(unknown)}; choose from distilled, random, "
                              "full")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("evaluate.steps and evaluate.batch_size must be >= 1")


@dataclass
class DistillConfig:
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    net: DistillNetConfig = field(default_factory=DistillNetConfig)
    match: DistillMatchConfig = field(default_factory=DistillMatchConfig)
    experts: DistillExpertConfig = field(default_factory=DistillExpertConfig)
    evaluate: DistillEvalConfig = field(default_factory=DistillEvalConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        m = self.match
        if m.method == "mtt" and m.mtt_max_start + m.mtt_span > self.experts.epochs:
            raise ConfigError(f"match.mtt_max_start + match.mtt_span ({m.mtt_max_start} + {m.mtt_span}) must "
                              f"not exceed experts.epochs ({self.experts.epochs})")
