"""Typed configuration of a karyotyping run (defaults < YAML < ``key.sub=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from holons.errors import ConfigError

Stain = Literal["gband", "rband", "qband", "auto"]
ScaleNorm = Literal["none", "cell"]
Variant = Literal["varifocal", "g_only", "l_whole", "sgma_parts", "pdisconet_parts"]
BoxGradient = Literal["mask", "sampling"]
DispatchMethod = Literal["none", "greedy", "optimal"]
LrSchedule = Literal["step", "cosine"]
OutputHead = Literal["auto", "best", "g", "l", "fusion", "mean"]


@dataclass
class KaryotypeDataConfig:
    """How chromosome images become fixed-size tensors, and how cases are split.

    ``stain`` names how the files look (``gband`` / ``rband``: dark bands on white, ``qband``:
    bright on black, ``auto``: decided per image, see :mod:`~holons.finetune.karyotype.preprocess`);
    every image is brought to one convention, bright chromosome on a black (0) background, with
    its intensity stretched to the foreground's own range. ``canvas`` is the side in source pixels
    of the square each chromosome (its foreground box, not its file) is centred on without
    stretching (0: the smallest multiple of 8 that holds ``canvas_percentile`` % of the training
    chromosomes' lengths; longer ones are shrunk to fit and counted). ``scale``: ``cell`` resizes
    every chromosome by the training set's typical length over its cell's median length, so a
    model moves between magnifications (relative lengths inside a cell are kept); ``none`` keeps
    source pixels. The canvas is then resized to
    ``zoom_source_size`` (what the varifocal zoom crops from; 0 = ``input_size``) and to
    ``input_size`` for the G-Net. ``default_polarity`` fills a missing polarity column (1:
    stored upright, -1: unknown, ignored by the polarity loss). ``max_train_cases`` (0: all) keeps a
    seeded subset of the training cases, for small CPU runs; validation and test stay whole.
    """

    stain: Stain = "auto"
    canvas: int = 0
    canvas_percentile: float = 99.5
    scale: ScaleNorm = "none"
    input_size: int = 64
    zoom_source_size: int = 0
    default_polarity: int = 1
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    split_seed: int = 0
    folds: int = 0
    fold: int = 0
    max_train_cases: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 16 or self.input_size % 4:
            raise ConfigError(f"data.input_size must be a multiple of 4 and >= 16, got {self.input_size}")
        if self.zoom_source_size and self.zoom_source_size < self.input_size:
            raise ConfigError("data.zoom_source_size must be 0 or at least data.input_size")
        if self.canvas < 0:
            raise ConfigError(f"data.canvas must be >= 0, got {self.canvas}")
        if not 50.0 <= self.canvas_percentile <= 100.0:
            raise ConfigError(f"data.canvas_percentile must be in [50, 100], got {self.canvas_percentile}")
        if self.default_polarity not in (-1, 0, 1):
            raise ConfigError("data.default_polarity must be 1 (upright), 0 (flipped) or -1 (unknown)")
        if not (0.0 <= self.test_fraction < 1.0 and 0.0 <= self.val_fraction < 1.0
                and self.test_fraction + self.val_fraction < 1.0):
            raise ConfigError("data.test_fraction and data.val_fraction must be in [0, 1) and sum below 1")
        if self.folds == 1 or self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise ConfigError("data.folds must be 0 (fixed split) or >= 2 with 0 <= data.fold < data.folds")

    @property
    def source_size(self) -> int:
        return self.zoom_source_size or self.input_size


@dataclass
class KaryotypeModelConfig:
    """G-Net / L-Net backbones (timm names; ``*_pretrained_dir``: a ``holons export`` folder).

    ``box_gradient``: how the L-Net's loss reaches the zoom box. ``mask`` (the design's): through a
    soft logistic box mask of steepness ``mask_steepness``; ``sampling``: the exact gradient of the
    bilinear crop with respect to its coordinates (as in spatial transformers). On pki-3 the mask
    gradient drove every localizer refinement to chance, the sampling gradient did not
    (docs/notes/lab_notebook.md).
    ``output_head``: the head the trained model reports and ``predict`` uses; ``auto`` = the last
    trained of fusion, L-Net, G-Net (the design's); ``mean`` averages the G and L probabilities;
    ``best``: the trained head with the best validation type accuracy, chosen after training and
    recorded with the model (a failed sub-net then cannot drag a ``mean`` head down).

    ``variant``: ``varifocal`` (G-Net, learned zoom box, L-Net on the zoom, fusion), ``g_only``,
    ``l_whole`` (the L-Net on the whole canvas), and two part-based local branches
    (:mod:`~holons.finetune.karyotype.part_branches`): ``sgma_parts`` (the L-Net on ``parts``
    attention crops of ``part_crop_fraction`` of the canvas) and ``pdisconet_parts`` (the L-Net's
    features pooled over ``parts`` discovered parts, ``part_dropout``); ``part_loss_weight`` weighs
    their auxiliary loss (attention diversity; part priors) while the L-Net trains.
    """

    variant: Variant = "varifocal"
    g_backbone: str = "resnet18"
    l_backbone: str = "resnet18"
    g_pretrained_dir: str | None = None
    l_pretrained_dir: str | None = None
    localizer_hidden: int = 256
    fusion_hidden: int = 512
    mask_steepness: float = 10.0
    box_gradient: BoxGradient = "mask"
    output_head: OutputHead = "auto"
    drop_rate: float = 0.0
    parts: int = 2
    part_crop_fraction: float = 0.5
    part_dropout: float = 0.3
    part_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.parts < 1 or not 0 < self.part_crop_fraction <= 1 or not 0 <= self.part_dropout < 1 \
                or self.part_loss_weight < 0:
            raise ConfigError("model.parts must be >= 1, model.part_crop_fraction in (0, 1], "
                              "model.part_dropout in [0, 1), model.part_loss_weight >= 0")


@dataclass
class KaryotypeTrainConfig:
    """The four-step schedule (epochs per step; 0 skips a step), Adam with a step or cosine decay,
    augmentation.

    ``epoch_steps`` sets the budget in optimizer steps rather than passes over the data: 0 makes an
    epoch one pass over the training chromosomes (so the budget grows with the data set, as tuned
    for pki-3's ~20k); N > 0 makes every epoch exactly N batches, drawn from as many reshuffled
    passes as needed (or from part of one pass), so a lab with 3k chromosomes gets as many updates
    as one with 20k, and a lab with 100k no more. Learning-rate decay, validation and
    checkpoints still count epochs.

    Step 3 alternates ``lnet_rounds`` times: ``lnet_epochs`` of L-Net training with the localizer
    frozen, then ``localizer_refine_epochs`` of localizer training from the L-Net's loss with the
    L-Net frozen, at ``lr * localizer_refine_lr_scale`` (a small step keeps the crops the L-Net
    has just learned on); with ``refine_keep_if_better`` a refinement that lowers the L-Net's
    validation type accuracy is undone (the soft-mask gradient is only a proxy for the zoom).
    Validation runs every ``val_every`` epochs and at the end of each phase (``val_every: 0``: only
    at the end). ``test_time_hflip`` averages the predictions of each chromosome and its mirror
    image (left-right; type and polarity do not change) at validation, test and predict time;
    ``test_time_vflip`` also averages with the upside-down image, whose polarity probabilities are
    swapped back (type kept, polarity reversed). ``warmup_steps`` raises the learning rate linearly
    over the first batches of every phase (at most its first epoch), which keeps the first large
    Adam steps from wrecking pretrained weights. ``lr_schedule``: ``step`` multiplies the lr by
    ``lr_gamma`` every ``lr_step_epochs`` epochs; ``cosine`` anneals it per epoch from ``lr``
    towards 0 over each phase's epochs. Augmentation of every training batch: random vertical flips (polarity
    swapped), horizontal flips (``hflip``), and a random affine pose jitter of up to
    ``augment_degrees`` of rotation, ``augment_scale`` of isotropic scale and ``augment_translate``
    of the side in shift (all 0: off); CutMix with foreground-area label mixing
    (``cutmix_prob``).

    ``dispatcher_steps`` > 0 fits a learned per-cell dispatcher after the model is saved and
    evaluated (as ``holons karyotype fit-dispatch`` does, with that many steps, seeded by ``seed``):
    it is saved into the model folder, ``eval/learned_dispatch.json`` compares it with the rules, and
    the run's summary gains the ``*_learned`` and ``*_learned_then_optimal`` metrics; 0: off.
    """

    gnet_epochs: int = 10
    localizer_epochs: int = 2
    lnet_rounds: int = 1
    lnet_epochs: int = 10
    localizer_refine_epochs: int = 1
    localizer_refine_lr_scale: float = 0.1
    refine_keep_if_better: bool = True
    fusion_epochs: int = 5
    batch_size: int = 64
    epoch_steps: int = 0
    lr: float = 1e-4
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    lr_schedule: LrSchedule = "step"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    polarity_weight: float = 0.5
    hflip: bool = True
    augment_degrees: float = 0.0
    augment_scale: float = 0.0
    augment_translate: float = 0.0
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0
    eval_batch_size: int = 256
    test_time_hflip: bool = False
    test_time_vflip: bool = False
    val_every: int = 1
    dispatcher_steps: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("gnet_epochs", "localizer_epochs", "lnet_rounds", "lnet_epochs",
                     "localizer_refine_epochs", "fusion_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0")
        if self.epoch_steps < 0:
            raise ConfigError("train.epoch_steps must be >= 0 (0: one pass over the data per epoch)")
        if self.dispatcher_steps < 0:
            raise ConfigError("train.dispatcher_steps must be >= 0 (0: no learned dispatcher)")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps must be >= 0")
        if self.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2")
        if self.lr <= 0 or self.lr_step_epochs < 1 or not 0 < self.lr_gamma <= 1:
            raise ConfigError("train.lr > 0, train.lr_step_epochs >= 1 and 0 < train.lr_gamma <= 1 required")
        if not (0.0 <= self.augment_degrees <= 180.0 and 0.0 <= self.augment_scale < 1.0
                and 0.0 <= self.augment_translate <= 0.5):
            raise ConfigError("train.augment_degrees must be in [0, 180], train.augment_scale in [0, 1) and "
                              "train.augment_translate in [0, 0.5]")
        if not 0.0 <= self.cutmix_prob <= 1.0 or self.cutmix_alpha <= 0:
            raise ConfigError("train.cutmix_prob must be in [0, 1] and train.cutmix_alpha > 0")


@dataclass
class KaryotypeConfig:
    """A whole karyotyping run: data, model, training and the dispatch used in evaluation."""

    data: KaryotypeDataConfig = field(default_factory=KaryotypeDataConfig)
    model: KaryotypeModelConfig = field(default_factory=KaryotypeModelConfig)
    train: KaryotypeTrainConfig = field(default_factory=KaryotypeTrainConfig)
    dispatch: DispatchMethod = "optimal"
