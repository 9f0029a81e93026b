"""Typed configuration of a pretraining run (``holons pretrain --config FILE.yaml key.sub=value``).

Defaults follow DESIGN.md (the paper's values); the YAML files under ``configs/pretrain/``
override what a given scale needs. Unknown keys and wrong types are ConfigErrors naming the key.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from holons.anatomy import ViewConfig
from holons.errors import ConfigError

StageMode = Literal["localizability", "part_whole"]


@dataclass
class ModelConfig:
    """Backbone and heads. ``out_dim`` is K, the number of localizability prototypes."""

    backbone: str = "convnext_base"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    out_dim: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    decomposition_norm: Literal["per_chunk", "joint"] = "per_chunk"


@dataclass
class DataConfig:
    """Where the images come from: a ``holons cache`` folder or a folder of image files.

    ``batch_size`` is the *global* batch (split evenly over ranks). Images are cached
    intensities in [0, 1]; the backbone sees ``(x - mean) / std`` (recorded in exports).

    Views of each step are drawn in ``view_groups`` equal slices of the global batch, each
    from its own seeded generator (default: one slice per rank). A one-process run with
    ``view_groups`` equal to a DDP run's world size sees exactly the views of that DDP run.
    """

    cache_dir: str | None = None
    images_dir: str | None = None
    split: str | None = None
    image_size: int | None = None
    max_images: int | None = None
    batch_size: int = 512
    num_workers: int = 0
    view_groups: int | None = None
    mean: float = 0.5
    std: float = 0.25


@dataclass
class LossConfig:
    """Weights and temperatures of the three branches (see holons.ssl.losses for the reduction).

    ``centering`` picks the teacher's anti-collapse step: ``center`` (DESIGN.md, subtract an EMA
    centre) or ``sinkhorn`` (``sinkhorn_iters`` Sinkhorn-Knopp rounds over the batch).
    ``w_koleo`` > 0 adds the KoLeo spreading term on the student's global-crop bottleneck
    embeddings (another anti-collapse option; 0 = off, DESIGN.md's method).
    """

    w_loc: float = 1.0
    w_comp: float = 1.0
    w_dec: float = 1.0
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: Literal["center", "sinkhorn"] = "center"
    sinkhorn_iters: int = 3
    w_koleo: float = 0.0
    embed_reduction: Literal["sum_dim", "mean"] = "sum_dim"


@dataclass
class MaskConfig:
    """Informed masking (after MASCOT; DESIGN.md "Informed masking"), an extra branch of ``adamv2`` and
    ``dino`` alike; off by default (and in every shipped config until it wins its ablation,
    ``configs/studies/informed_masking.yaml``).

    The EMA teacher's saliency over a ``grid`` x ``grid`` patch grid of each global crop picks a
    high-informed mask (the ``ratio_high`` most salient patches) and a low-informed mask (the
    ``ratio_low`` least salient). The student sees both masked crops: from the high-masked one it
    predicts the teacher's patch features at the masked positions through a small predictor
    (``loss_complete``, weight ``w_complete``); the pooled embeddings of the two masked crops agree
    with each other and with the teacher's embedding of the whole crop (``loss_agree``, ``w_agree``).

    ``saliency``: ``attention`` (the teacher's class-token attention in its last block, ViTs),
    ``feature_norm`` (the norm of the teacher's patch features, any backbone), ``pooled_similarity``
    (cosine of each patch feature to the pooled embedding) or ``auto`` (attention for ViTs, feature
    norm otherwise). ``grid``: patches per side (default: the teacher's dense map, e.g. 2 for a
    ConvNeXt at 64 px); saliency and features are resampled to it. ``loss``: ``cosine`` or
    ``smooth_l1`` (on layer-normalized features) between predictions and targets.
    """

    enabled: bool = False
    saliency: Literal["auto", "attention", "feature_norm", "pooled_similarity"] = "auto"
    grid: int | None = None
    ratio_high: float = 0.5
    ratio_low: float = 0.5
    w_complete: float = 1.0
    w_agree: float = 1.0
    loss: Literal["cosine", "smooth_l1"] = "cosine"
    predictor_hidden: int = 256


@dataclass
class OptimConfig:
    """AdamW with linear warm-up + cosine lr, cosine weight decay, EMA momentum 0.996 -> 1.

    ``lr`` is per 256 images of global batch (linear scaling). Warm-up and the last-layer
    freeze are in epochs; a stage's schedules start afresh at the stage's first step.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1.0
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0


@dataclass
class StageConfig:
    """One curriculum stage: its branches (``mode``), its levels, and its length per level."""

    mode: StageMode = "part_whole"
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs_per_level: float | None = None
    steps_per_level: int | None = None


def _default_stages() -> list[StageConfig]:
    return [StageConfig(mode="localizability", epochs_per_level=1.0),
            StageConfig(mode="part_whole", epochs_per_level=1.0)]


@dataclass
class CurriculumConfig:
    """Stage 1 localizability only, stage 2 all branches, each over granularity levels 0 -> 1 -> 2."""

    stages: list[StageConfig] = field(default_factory=_default_stages)


@dataclass
class PerfConfig:
    """Throughput knobs of the pretraining step (``holons.ssl.perf``). Each is off by default, which is
    the reference step (bit-exact resume on CPU); each on is tested on CPU to run and to leave the
    numbers equal (``teacher_inference_mode``, ``uint8_transfer``, ``prefetch``, ``lazy_timing``)
    or within float rounding (``channels_last``, ``compile``, ``adamw``). Keep on what measures
    faster on the target machine (``benchmarks/bench_pretrain.py --only f``,
    ``tools/device_bench_pretrain.sh``). Not part of the experiment: a run may resume with other
    knobs.

    - ``channels_last``: weights and every backbone input in NHWC (tensor cores' layout for convs).
    - ``compile``: ``torch.compile`` of the student (backbone + heads) and the teacher's backbone and
      head; when compiling fails, one warning and the run continues uncompiled.
      ``compile_backend`` / ``compile_mode``: torch.compile's ``backend`` / ``mode``.
    - ``adamw``: ``default`` (torch's choice), ``foreach`` (multi-tensor) or ``fused`` (one kernel).
    - ``teacher_inference_mode``: the teacher forward under ``torch.inference_mode`` and, on CUDA,
      bf16 autocast whatever ``amp`` says.
    - ``uint8_transfer``: batches travel as the stored integers (4x fewer bytes than float32) and
      become [0, 1] floats on the device, where the views and intensity augmentation are drawn.
    - ``prefetch``: batches read ahead by a background thread (pinned on CUDA, copied
      asynchronously), so reading the cache overlaps the step.
    - ``lazy_timing``: CUDA is synchronized for the step-time split only at the steps that close a
      log window (4 host syncs per step fewer); the splits of the other steps are host times, and
      a window's total (``img_per_s``) stays its wall time. One host read per step remains: the
      all-reduced loss that decides whether a non-finite step is skipped.
    """

    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    adamw: Literal["default", "foreach", "fused"] = "default"
    teacher_inference_mode: bool = False
    uint8_transfer: bool = False
    prefetch: int = 0
    """Batches read ahead (0: read inside the step)."""
    lazy_timing: bool = False


@dataclass
class DebugConfig:
    """Fault injection for tests: the loss is set to NaN at these global steps."""

    nan_loss_steps: list[int] = field(default_factory=list)


@dataclass
class PretrainConfig:
    """A whole pretraining run. ``method`` names a module of ``holons.ssl.methods`` (``adamv2``, or
    ``dino``, the baseline: localizability only at level 0, one stage with the same total number of
    steps as the configured curriculum).

    Whether a run resumes or starts over is not part of its config: ``pretrain(..., resume=True)`` /
    ``overwrite=True`` (CLI ``--resume`` / ``--overwrite``)."""

    method: str = "adamv2"
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool | None = None
    """TensorBoard events in ``RUN/tb/`` (the optional extra: ``pip install 'holons[tensorboard]'``):
    ``None`` writes them when the package is installed, ``true`` asks for them (one warning line
    when it is not installed; the run goes on without them), ``false`` never writes them."""
    max_nan_steps: int = 20
    max_steps: int | None = None
    init_from: str | None = None
    perf: PerfConfig = field(default_factory=PerfConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass(frozen=True)
class Segment:
    """A contiguous run of steps at one (stage, level); steps are global optimizer steps."""

    stage: int
    mode: StageMode
    level: int
    start: int
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def validate(cfg: PretrainConfig) -> None:
    """Checks that need more than types; raises ConfigError naming the key."""
    d = cfg.data
    if (d.cache_dir is None) == (d.images_dir is None):
        raise ConfigError("set exactly one of data.cache_dir and data.images_dir")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
    if d.view_groups is not None and (d.view_groups < 1 or d.batch_size % d.view_groups):
        raise ConfigError(f"data.view_groups must divide data.batch_size={d.batch_size}, got {d.view_groups}")
    if d.std <= 0:
        raise ConfigError(f"data.std must be > 0, got {d.std}")
    if not cfg.curriculum.stages:
        raise ConfigError("curriculum.stages is empty")
    for i, st in enumerate(cfg.curriculum.stages):
        key = f"curriculum.stages[{i}]"
        if not st.levels or any(lv < 0 for lv in st.levels):
            raise ConfigError(f"{key}.levels must be a non-empty list of levels >= 0, got {st.levels}")
        if (st.epochs_per_level is None) == (st.steps_per_level is None):
            raise ConfigError(f"{key}: set exactly one of epochs_per_level and steps_per_level")
        if (st.steps_per_level is not None and st.steps_per_level < 1) or (
                st.epochs_per_level is not None and st.epochs_per_level <= 0):
            raise ConfigError(f"{key}: the length per level must be positive")
    if cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ConfigError("checkpoint_every and log_every must be >= 1")
    if cfg.max_nan_steps < 0:
        raise ConfigError(f"max_nan_steps must be >= 0, got {cfg.max_nan_steps}")
    if cfg.loss.sinkhorn_iters < 1:
        raise ConfigError(f"loss.sinkhorn_iters must be >= 1, got {cfg.loss.sinkhorn_iters}")
    m = cfg.mask
    for key in ("ratio_high", "ratio_low"):
        if not 0 < getattr(m, key) < 1:
            raise ConfigError(f"mask.{key} must be in (0, 1), got {getattr(m, key)}")
    if m.grid is not None and m.grid < 2:
        raise ConfigError(f"mask.grid must be >= 2 patches per side, got {m.grid}")
    if m.w_complete < 0 or m.w_agree < 0:
        raise ConfigError("mask.w_complete and mask.w_agree must be >= 0")
    if m.predictor_hidden < 1:
        raise ConfigError(f"mask.predictor_hidden must be >= 1, got {m.predictor_hidden}")
    if cfg.optim.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be > 0, got {cfg.optim.clip_grad}")
    if cfg.perf.prefetch < 0:
        raise ConfigError(f"perf.prefetch must be >= 0, got {cfg.perf.prefetch}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")


def curriculum_segments(cfg: PretrainConfig, steps_per_epoch: int) -> list[Segment]:
    """The curriculum's (stage, level) segments in order, with their global step ranges.

    A method may plan its run differently (``holons.ssl.methods.plan_segments``: ``dino`` collapses
    the curriculum into one stage).
    """
    segments: list[Segment] = []
    start = 0
    for i, st in enumerate(cfg.curriculum.stages):
        n = st.steps_per_level if st.steps_per_level is not None else max(
            1, math.ceil(st.epochs_per_level * steps_per_epoch))
        for level in st.levels:
            segments.append(Segment(stage=i, mode=st.mode, level=level, start=start, steps=n))
            start += n
    return segments


# Keys a run may change when it is resumed (run control, not the experiment).
RUN_CONTROL_KEYS = ("init_from", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "debug",
                    "max_nan_steps", "tensorboard", "perf")
# Config keys until they became arguments (pretrain(resume=, overwrite=), --resume / --overwrite).
RUN_FLAGS = ("resume", "overwrite")


def _reject_run_flags(tree: Any, where: str) -> None:
    """``resume`` / ``overwrite`` were config keys; now they are arguments: one clear line."""
    if isinstance(tree, dict):
        for key in RUN_FLAGS:
            if key in tree:
                raise ConfigError(f"{where}: '{key}' is no longer a config key; remove it and pass "
                                  f"--{key} to `holons pretrain` ({key}=True to pretrain())")


def resolve_config(config: PretrainConfig | str | Path | dict,
                   overrides: list[str] | None = None) -> PretrainConfig:
    """defaults < config (YAML path, dataclass or dict) < ``key.sub=value`` overrides."""
    import yaml

    from holons.config import load_config, parse_overrides, to_dict

    extra = parse_overrides(overrides)
    _reject_run_flags(extra, "override")
    if isinstance(config, (str, Path)):
        with contextlib.suppress(OSError, yaml.YAMLError):  # load_config reports a missing or broken file
            _reject_run_flags(yaml.safe_load(Path(config).read_text()), str(config))
        return load_config(PretrainConfig, config, extra)
    base = to_dict(config) if isinstance(config, PretrainConfig) else dict(config)
    _reject_run_flags(base, "config")
    return load_config(PretrainConfig, base, extra)
