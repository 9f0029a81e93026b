"""The pretraining loop: ``pretrain(config, out)`` and the step around the building blocks.

One step: a batch of cached images (``holons.ssl.stream``) -> all views (``holons.anatomy``) -> the
method's losses (``holons.ssl.methods``: EMA teacher targets and student outputs) -> AdamW step
with per-tensor clipping -> EMA teacher update -> centre update (all-reduced).

Run dir (only rank 0 writes; folder rules, log and checkpoints from ``holons.runs``)::

    RUN/config.yaml      the resolved config
    RUN/train.log        human-readable log
    RUN/metrics.jsonl    one JSON line per log step (losses, lr, wd, momentum, throughput,
                         teacher entropy, centre norm, step time split data/views/fwd-bwd/update)
    RUN/tb/              TensorBoard events (config ``tensorboard``; needs ``holons[tensorboard]``)
    RUN/checkpoints/     step_XXXXXXXX.pt (weights_only-loadable, with git commit and versions)
    RUN/exported/        the teacher backbone, timm-loadable (written at the end)

A run dir with a checkpoint is refused unless ``resume=True`` or ``overwrite=True`` (CLI
``--resume`` / ``--overwrite``); one holding only the leftovers of a run that stopped before its
first checkpoint is cleared and reused.

Determinism: data order is a function of (seed, epoch); the views of a step and the global
RNGs are reseeded from (seed, step, slice / rank) at every step, so a run resumed from a
checkpoint on CPU continues bit-exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from holons.anatomy import ViewGenerator, Views
from holons.config import save_config, to_dict
from holons.errors import ConfigError, HolonsError
from holons.runs import (
    CHECKPOINTS,
    Run,
    RunLog,
    StopSignal,
    capture_rng_state,
    changed_keys,
    latest_checkpoint,
    load_checkpoint,
    prepare_run,
    progress_enabled,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from holons.ssl import distributed as du
from holons.ssl.config import RUN_CONTROL_KEYS, PretrainConfig, Segment, resolve_config, validate
from holons.ssl.losses import LocalizabilityLoss
from holons.ssl.methods import Losses, get_method
from holons.ssl.optim import clip_gradients_per_tensor, param_groups, set_lr, set_weight_decay
from holons.ssl.perf import (
    CompileFallback,
    adamw_options,
    apply_channels_last,
    channels_last_input,
    compile_forwards,
    teacher_inference_forwards,
    to_unit_interval,
)
from holons.ssl.schedules import lr_schedule, momentum_schedule, scaled_lr, weight_decay_schedule
from holons.ssl.step_record import StepTimer, summary_line, window_record
from holons.ssl.stream import BatchStream, build_dataset, derive_seed, draw_views, stored_max_value
from holons.ssl.student import build_student
from holons.ssl.teacher import make_teacher, update_teacher

__all__ = ["PretrainResult", "Trainer", "pretrain"]

log = logging.getLogger("holons.pretrain")
RESULTS = ("exported",)  # what a finished run adds to the run layer's entries


@dataclass
class PretrainResult:
    """What a ``pretrain`` call did: where, how far, and how it ended."""

    run_dir: Path
    step: int
    total_steps: int
    status: str  # "finished" | "stopped" (max_steps) | "terminated" (SIGTERM / SIGINT)
    nan_steps: int
    last_metrics: dict[str, Any] = field(default_factory=dict)
    student: nn.Module | None = field(default=None, repr=False)
    """The trained ``StudentNet`` (backbone + heads), in memory on this rank."""
    teacher: nn.Module | None = field(default=None, repr=False)
    """The EMA teacher (backbone + localizability head)."""
    signum: int | None = None
    """The signal that stopped a ``terminated`` run."""


def _amp_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Trainer:
    """State and step logic of one pretraining run (see ``pretrain``); the method's objective reads
    it as its ``holons.ssl.methods.LossContext``."""

    def __init__(self, cfg: PretrainConfig, out: Path, info: du.DistInfo) -> None:
        self.cfg, self.out, self.info = cfg, out, info
        self.method = get_method(cfg.method)
        self.device = info.device
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        self.student = build_student(cfg).to(self.device)
        self.teacher = make_teacher(self.student.encoder)
        self.loc_loss = LocalizabilityLoss(cfg.model.out_dim, cfg.loss.teacher_temp, cfg.loss.student_temp,
                                           cfg.loss.center_momentum, cfg.loss.centering,
                                           cfg.loss.sinkhorn_iters).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.optim.weight_decay), lr=0.0,
                                           betas=tuple(cfg.optim.betas), **adamw_options(cfg.perf.adamw))
        self.views = ViewGenerator(cfg.views)
        self.dataset = build_dataset(cfg)
        self.max_value = stored_max_value(self.dataset)
        self.compiled = self._apply_perf()
        self.steps_per_epoch = len(self.dataset) // cfg.data.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {len(self.dataset)} "
                              "training images")
        self.segments = self.method.segments(cfg, self.steps_per_epoch)
        self.total_steps = self.segments[-1].end
        self.view_groups = cfg.data.view_groups or info.world_size
        if self.view_groups % info.world_size:
            raise ConfigError(f"data.view_groups={self.view_groups} must be a multiple of the "
                              f"{info.world_size} ranks")
        self.step = 0
        self.nan_steps = 0
        self.model: nn.Module = self.student
        self._stage_mode: str | None = None
        self._schedules: dict[int, dict[str, np.ndarray]] = {}

    def _apply_perf(self) -> CompileFallback | None:
        """The ``perf`` knobs that change the modules (``holons.ssl.perf``); the compiled forwards."""
        p = self.cfg.perf
        if p.channels_last:
            apply_channels_last(self.student, self.teacher)
        compiled = compile_forwards((self.student, self.teacher.backbone, self.teacher.loc_head), p) if (
            p.compile) else None
        if p.teacher_inference_mode:
            teacher_inference_forwards((self.teacher.backbone, self.teacher.loc_head), self.device)
        return compiled

    # ------------------------------------------------------------------ schedules
    def _stage_bounds(self, stage: int) -> tuple[int, int]:
        segs = [s for s in self.segments if s.stage == stage]
        return segs[0].start, segs[-1].end

    def schedules(self, stage: int) -> dict[str, np.ndarray]:
        """lr, weight decay and EMA momentum of a stage, indexed by step within the stage."""
        if stage not in self._schedules:
            o = self.cfg.optim
            start, end = self._stage_bounds(stage)
            n = end - start
            warmup = min(n, round(o.warmup_epochs * self.steps_per_epoch))
            self._schedules[stage] = {
                "lr": lr_schedule(scaled_lr(o.lr, self.cfg.data.batch_size), n, warmup, o.min_lr),
                "wd": weight_decay_schedule(n, o.weight_decay, o.weight_decay_end),
                "momentum": momentum_schedule(n, o.momentum_teacher, o.momentum_teacher_end),
            }
        return self._schedules[stage]

    def segment_at(self, step: int) -> Segment:
        for seg in self.segments:
            if seg.start <= step < seg.end:
                return seg
        return self.segments[-1]

    # ------------------------------------------------------------------ stage set-up
    def branches(self, mode: str) -> tuple[bool, bool]:
        """(composition, decomposition) active in this mode."""
        pw = mode == "part_whole"
        return pw and self.cfg.loss.w_comp > 0, pw and self.cfg.loss.w_dec > 0

    def enter_stage(self, mode: str) -> None:
        """Make only the active heads trainable and (re)wrap the student for DDP accordingly."""
        if mode == self._stage_mode:
            return
        comp, dec = self.branches(mode)
        self.student.comp_head.requires_grad_(comp)
        self.student.dec_head.requires_grad_(dec)
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.student, device_ids=ids)
        self._stage_mode = mode

    # ------------------------------------------------------------------ one step
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.cfg.data.mean) / self.cfg.data.std
        return channels_last_input(x) if self.cfg.perf.channels_last else x

    def make_views(self, images: torch.Tensor, seg: Segment, step: int) -> Views:
        """Views of the local batch, slice by slice, each slice from its own seeded generator."""
        per_rank = self.view_groups // self.info.world_size
        return draw_views(self.views, images, level=seg.level, mode=seg.mode, seed=self.cfg.seed, step=step,
                          first_slice=self.info.rank * per_rank, slices=per_rank, device=self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def losses(self, v: Views, seg: Segment) -> Losses:
        """Total loss, its terms and diagnostics, and the teacher logits for the centre update."""
        return self.method.losses(self, v, seg)

    def closes_window(self, step: int) -> bool:
        """Whether step ``step`` (0-based) is the last of a log window (the loop logs after it)."""
        n = step + 1
        return n % self.cfg.log_every == 0 or n == self.segment_at(step).end or n == self.cfg.max_steps

    def train_step(self, images: torch.Tensor, seg: Segment, stop_flag: bool
                   ) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns the (rank-averaged) metrics and whether any rank asked to stop."""
        cfg, step = self.cfg, self.step
        torch.manual_seed(derive_seed(cfg.seed, step, self.info.rank, 0x6A0B))
        timer = StepTimer(self.device, sync=not cfg.perf.lazy_timing or self.closes_window(step))
        images = to_unit_interval(images.to(self.device, non_blocking=True), self.max_value)
        timer.lap("transfer")
        v = self.make_views(images, seg, step)
        timer.lap("views")
        self.enter_stage(seg.mode)
        self.student.train()
        sched = self.schedules(seg.stage)
        i = step - self._stage_bounds(seg.stage)[0]
        lr, wd, momentum = float(sched["lr"][i]), float(sched["wd"][i]), float(sched["momentum"][i])
        set_lr(self.optimizer, lr)
        set_weight_decay(self.optimizer, wd)

        total, terms, teacher_logits = self.losses(v, seg)
        if step in cfg.debug.nan_loss_steps:
            total = total * float("nan")
        names = ["loss", *terms, "stop"]
        stats = torch.stack([total.detach().float(), *[t.detach().float() for t in terms.values()],
                             torch.tensor(1.0 if stop_flag else 0.0, device=self.device)])
        du.all_reduce_mean(stats)
        values = dict(zip(names, stats.tolist(), strict=True))
        stop_any = values.pop("stop") > 0
        finite = math.isfinite(values["loss"])
        if finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            timer.lap("fwd_bwd")
            self.scaler.unscale_(self.optimizer)
            clip_gradients_per_tensor(self.student, cfg.optim.clip_grad)
            if seg.stage == 0 and step < round(cfg.optim.freeze_last_layer_epochs * self.steps_per_epoch):
                self.student.encoder.loc_head.cancel_last_layer_grad()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            update_teacher(self.student.encoder, self.teacher, momentum)
            self.loc_loss.update_center(teacher_logits)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_steps += 1
            timer.lap("fwd_bwd")
        timer.lap("update")
        self.step += 1
        values.update(lr=lr, wd=wd, momentum=momentum, finite=finite, **timer.splits())
        return values, stop_any

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        seg = self.segment_at(max(self.step - 1, 0))
        s = self.student
        return {
            "step": self.step, "stage": seg.stage, "level": seg.level, "mode": seg.mode,
            "total_steps": self.total_steps, "nan_steps": self.nan_steps,
            "student": {"backbone": s.encoder.backbone.model.state_dict(),
                        "loc_head": s.encoder.loc_head.state_dict(),
                        "comp_head": s.comp_head.state_dict(), "dec_head": s.dec_head.state_dict(),
                        **({"mask_head": s.mask_head.state_dict()} if s.mask_head is not None else {})},
            "teacher": {"backbone": self.teacher.backbone.model.state_dict(),
                        "loc_head": self.teacher.loc_head.state_dict()},
            "loss": self.loc_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "config": to_dict(self.cfg),
        }

    def load_weights(self, state: dict[str, Any]) -> None:
        s, t = state["student"], state["teacher"]
        try:
            self.student.encoder.backbone.model.load_state_dict(s["backbone"])
            self.student.encoder.loc_head.load_state_dict(s["loc_head"])
            self.student.comp_head.load_state_dict(s["comp_head"])
            self.student.dec_head.load_state_dict(s["dec_head"])
            if self.student.mask_head is not None and "mask_head" in s:  # else it starts afresh
                self.student.mask_head.load_state_dict(s["mask_head"])
            self.teacher.backbone.model.load_state_dict(t["backbone"])
            self.teacher.loc_head.load_state_dict(t["loc_head"])
            self.loc_loss.load_state_dict(state["loss"])
        except (KeyError, RuntimeError) as e:
            raise HolonsError(f"checkpoint does not match this model configuration: {e}") from e

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_weights(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nan_steps = int(state["nan_steps"])
        restore_rng_state(state["rng"])

    def init_from(self, source: str) -> None:
        """Weights only (student, teacher, centre) from a run / checkpoint, or a backbone from an export."""
        path = Path(source)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            from safetensors.torch import load_file

            weights = load_file(str(path / "model.safetensors"))
            try:
                self.student.encoder.backbone.model.load_state_dict(weights)
                self.teacher.backbone.model.load_state_dict(weights)
            except RuntimeError as e:
                raise HolonsError(f"init_from {path}: backbone does not match model.backbone: {e}") from e
            return
        self.load_weights(load_checkpoint(resolve_checkpoint(path), map_location=self.device))

    def save(self, keep: set[int]) -> None:
        if self.info.is_main:
            save_checkpoint(self.state(), self.out / CHECKPOINTS, self.step,
                            keep_last=self.cfg.keep_checkpoints, keep_steps=keep)
        du.barrier()


def pretrain(config: PretrainConfig | str | Path | dict, out: str | Path, overrides: list[str] | None = None,
             *, resume: bool = False, overwrite: bool = False,
             progress: bool | None = None) -> PretrainResult:
    """Pretrain a foundation backbone; see the module docstring for the run dir.

    ``config`` is a YAML path, a ``PretrainConfig`` or a plain dict; ``overrides`` are
    ``key.sub=value`` strings. ``resume``: continue the run in ``out`` from its last checkpoint
    (bit-exact on CPU); ``overwrite``: start over in a folder holding a run. Under ``torchrun``
    every rank calls this; only rank 0 writes. ``progress``: tqdm bar on rank 0 (default: when
    stderr is a terminal).
    """
    cfg = resolve_config(config, overrides)
    validate(cfg)
    get_method(cfg.method)
    if resume and cfg.init_from:
        raise ConfigError("--resume and init_from cannot both be set: --resume continues this run, "
                          "init_from starts a new run from another run's weights")
    out = Path(out)
    info = du.init_distributed(cfg.device)
    try:
        run = prepare_run(out, resume=resume, overwrite=overwrite, results=RESULTS) if info.is_main else (
            Run(out, resume=resume))
        du.barrier()
        return _run(cfg, run, info, progress)
    finally:
        if info.distributed:
            du.cleanup()


def _run(cfg: PretrainConfig, run: Run, info: du.DistInfo, progress: bool | None) -> PretrainResult:
    out = run.dir
    resume_path = latest_checkpoint(run.checkpoints) if run.resume else None
    if run.resume and resume_path is None:
        raise HolonsError(f"nothing to resume in {out}: no step_XXXXXXXX.pt checkpoint of a pretraining run")
    show_bar = info.is_main and progress_enabled(progress)
    echo = logging.WARNING if show_bar else logging.INFO
    record = RunLog(out, log, active=info.is_main, echo=echo, tensorboard=cfg.tensorboard)
    try:
        if run.cleared:
            log.warning("run dir %s had no checkpoint (a run that stopped before its first one); cleared its "
                        "leftovers (%s) and starting a new run", out, ", ".join(run.cleared))
        trainer = Trainer(cfg, out, info)
        if resume_path is not None:
            # on the CPU: load_state copies weights to the device, AdamW keeps its step counters
            # on the CPU as in an uninterrupted run, and the RNG setters take CPU tensors only
            state = load_checkpoint(resume_path, map_location="cpu")
            trainer.load_state(state)
            record.close()
            record = RunLog(out, log, active=info.is_main, echo=echo, tensorboard=cfg.tensorboard,
                            announce=False, resume_step=trainer.step)
            log.info("resumed from %s at step %d (stage %d, level %d)", resume_path.name, trainer.step,
                     state["stage"], state["level"])
            changed = changed_keys(state["config"], to_dict(cfg), ignore=RUN_CONTROL_KEYS)
            if changed:
                log.warning("the config differs from the checkpoint's in %s; the resumed run will not "
                            "match an uninterrupted one", ", ".join(changed))
        elif cfg.init_from:
            trainer.init_from(cfg.init_from)
            log.info("initialized weights from %s", cfg.init_from)
        if info.is_main:
            save_config(cfg, run.config_file)
        return _loop(trainer, record, show_bar)
    finally:
        record.close()


def _loop(tr: Trainer, record: RunLog, show_bar: bool) -> PretrainResult:
    cfg, info = tr.cfg, tr.info
    skipped = getattr(tr.dataset, "skipped", 0)
    log.info("pretrain: method %s, %s, %d images (%d unreadable skipped), global batch %d on %d rank(s), "
             "%d steps/epoch, %d steps in %d segments, device %s, amp %s", cfg.method, cfg.model.backbone,
             len(tr.dataset), skipped, cfg.data.batch_size, info.world_size, tr.steps_per_epoch,
             tr.total_steps, len(tr.segments), tr.device, tr.amp_dtype or "off")
    end = tr.total_steps if cfg.max_steps is None else min(tr.total_steps, cfg.max_steps)
    boundaries = {s.end for s in tr.segments}
    stream = BatchStream(tr.dataset, cfg.data.batch_size, cfg.seed, info.rank, info.world_size,
                         cfg.data.num_workers, tr.step, tr.device.type == "cuda", cfg.perf.prefetch)
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=tr.step, desc="pretrain", unit="step", dynamic_ncols=True)
    status, window, last = "finished", [], {}
    current = None
    with StopSignal() as stop:
        while tr.step < end:
            seg = tr.segment_at(tr.step)
            if seg != current:
                log.info("step %d: stage %d (%s), level %d, %d steps", tr.step, seg.stage, seg.mode,
                         seg.level, seg.steps)
                current = seg
            t0 = time.perf_counter()
            images = stream.next()
            t_data = time.perf_counter() - t0
            values, stop_any = tr.train_step(images, seg, stop.requested)
            values["time_data"] = t_data + values.pop("time_transfer")
            window.append(values)
            if not values["finite"]:
                log.warning("step %d: non-finite loss, step skipped (%d so far, limit %d)", tr.step - 1,
                            tr.nan_steps, cfg.max_nan_steps)
                if tr.nan_steps > cfg.max_nan_steps:
                    tr.save(boundaries)
                    raise HolonsError(f"training diverged: {tr.nan_steps} steps with a NaN/inf loss "
                                      f"(max_nan_steps={cfg.max_nan_steps}); checkpoint at step {tr.step}; "
                                      "lower optim.lr or check the data")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.3f}", stage=seg.stage, level=seg.level)
            if tr.step % cfg.log_every == 0 or tr.step == end or tr.step in boundaries:
                last = window_record(tr.step, seg, window, cfg.data.batch_size, tr.nan_steps,
                                     tr.steps_per_epoch)
                record.metrics(last)
                log.info("step %d/%d %s", tr.step, tr.total_steps, summary_line(last))
                window = []
            if stop_any:
                tr.save(boundaries)
                status = "terminated"
                signum = stop.signum or signal.SIGTERM  # another rank's signal reaches this one as a flag
                log.info("%s: checkpoint written at step %d; exiting cleanly (continue with --resume)",
                         signal.Signals(signum).name, tr.step)
                break
            if tr.step % cfg.checkpoint_every == 0 or tr.step in boundaries or tr.step == end:
                tr.save(boundaries)
    stream.close()
    if bar is not None:
        bar.close()
    if status == "finished" and tr.step < tr.total_steps:
        status = "stopped"
    if status == "finished" and info.is_main:
        from holons.ssl.export import export

        export(tr.out, tr.out / "exported", which="teacher")
        log.info("finished %d steps; teacher backbone exported to %s", tr.step, tr.out / "exported")
    du.barrier()
    return PretrainResult(tr.out, tr.step, tr.total_steps, status, tr.nan_steps, last, tr.student, tr.teacher,
                          signum if status == "terminated" else None)
