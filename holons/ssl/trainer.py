"""The pretraining loop: ``pretrain(config, out)`` and what it needs around the building blocks.

One step: a batch of cached images -> all views (``holons.anatomy``) -> EMA teacher targets and
student outputs -> localizability / composability / decomposability losses -> AdamW step with
per-tensor clipping -> EMA teacher update -> centre update (all-reduced).

Run dir (only rank 0 writes)::

    RUN/config.yaml      the resolved config
    RUN/train.log        human-readable log
    RUN/metrics.jsonl    one JSON line per log step (losses, lr, wd, momentum, throughput,
                         teacher entropy, centre norm, step time split data/views/fwd-bwd/update)
    RUN/tb/              TensorBoard events (config ``tensorboard``; needs ``holons[tensorboard]``)
    RUN/checkpoints/     step_XXXXXXXX.pt (weights_only-loadable)
    RUN/exported/        the teacher backbone, timm-loadable (written at the end)

A run dir with a checkpoint is refused unless ``resume`` or ``overwrite``; one holding only the
leftovers of a run that stopped before its first checkpoint is cleared and reused.

Determinism: data order is a function of (seed, epoch); the views of a step and the global
RNGs are reseeded from (seed, step, slice / rank) at every step, so a run resumed from a
checkpoint on CPU continues bit-exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from holons.anatomy import ViewGenerator, Views
from holons.config import load_config, save_config, to_dict
from holons.errors import ConfigError, HolonsError
from holons.signals import StopSignal
from holons.ssl import distributed as du
from holons.ssl.backbone import create_backbone
from holons.ssl.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from holons.ssl.config import PretrainConfig, Segment, plan_segments, validate
from holons.ssl.heads import CompositionHead, DecompositionHead, LocalizabilityHead
from holons.ssl.losses import (
    LocalizabilityLoss,
    composition_loss,
    decomposition_loss,
    koleo_loss,
    mix_teacher_probs,
)
from holons.ssl.optim import clip_gradients_per_tensor, param_groups, set_lr, set_weight_decay
from holons.ssl.schedules import lr_schedule, momentum_schedule, scaled_lr, weight_decay_schedule
from holons.ssl.teacher import make_teacher, update_teacher

__all__ = ["ImageFolderDataset", "PretrainResult", "StudentNet", "build_dataset", "pretrain"]

log = logging.getLogger("holons.pretrain")
RUN_ENTRIES = ("config.yaml", "train.log", "metrics.jsonl", "tb", "checkpoints", "exported")
# What a run leaves before its first checkpoint: a folder holding only these and no checkpoint is reused.
LEFTOVER_ENTRIES = ("config.yaml", "train.log", "metrics.jsonl", "tb", "checkpoints")


# --------------------------------------------------------------------------- data
class ImageFolderDataset(Dataset):
    """Every readable image under a folder, decoded once, fitted to ``size x size`` (aspect kept,
    zero-padded, as the cache does) and held in memory as uint8. For small folders (tests, demos);
    large archives go through ``holons index`` + ``holons cache``. Unreadable files are counted
    in ``skipped`` and left out."""

    def __init__(self, root: str | Path, size: int, max_images: int | None = None) -> None:
        from holons.data.formats import detect_format
        from holons.data.preprocess import Preprocessing

        root = Path(root)
        if not root.is_dir():
            raise HolonsError(f"data.images_dir {root} is not a folder")
        images, self.skipped = [], 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if max_images is not None and len(images) >= max_images:
                break
            if detect_format(path) is None:
                continue
            try:
                canvas, _ = Preprocessing(size=size).read(path)
            except HolonsError:
                self.skipped += 1
                continue
            images.append(np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8))
        if not images:
            raise HolonsError(f"data.images_dir {root} holds no readable images")
        self.images = np.stack(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index].astype(np.float32) / 255.0).unsqueeze(0)


def build_dataset(cfg: PretrainConfig) -> Dataset:
    """The training images of ``cfg.data``: a ``holons cache`` folder or a folder of image files."""
    d = cfg.data
    if d.cache_dir is not None:
        from holons.data.dataset import CachedImageDataset

        ds: Dataset = CachedImageDataset(d.cache_dir, split=d.split)
        if d.max_images is not None and d.max_images < len(ds):
            ds = torch.utils.data.Subset(ds, range(d.max_images))
        return ds
    size = d.image_size or cfg.views.global_size
    return ImageFolderDataset(d.images_dir, size, d.max_images)


def _seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (seed, step, slice, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


class _IndexBatches(torch.utils.data.Sampler):
    """The local batches of one epoch from a starting step: rank ``r`` takes slice ``r`` of each
    global batch of a (seed, epoch)-permutation (drop-last, so every step sees a full batch)."""

    def __init__(self, order: np.ndarray, start: int, global_batch: int, rank: int, world: int) -> None:
        self.order, self.start, self.gb = order, start, global_batch
        self.local = global_batch // world
        self.offset = rank * self.local
        self.n = len(order) // global_batch

    def __len__(self) -> int:
        return max(0, self.n - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.n):
            lo = b * self.gb + self.offset
            yield self.order[lo:lo + self.local].tolist()


class BatchStream:
    """Endless local batches, step by step, reproducible from (seed, step) alone."""

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, rank: int, world: int,
                 num_workers: int, start_step: int, pin_memory: bool) -> None:
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} must be divisible by the {world} ranks")
        if len(dataset) < global_batch:
            raise ConfigError(f"data.batch_size={global_batch} exceeds the {len(dataset)} training images")
        self.dataset, self.gb, self.seed = dataset, global_batch, seed
        self.rank, self.world, self.workers, self.pin = rank, world, num_workers, pin_memory
        self.steps_per_epoch = len(dataset) // global_batch
        self.step = start_step
        self._it: Iterator | None = None

    def _epoch_loader(self) -> Iterator:
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, 0xDA7A))
        order = torch.randperm(len(self.dataset), generator=g).numpy()
        sampler = _IndexBatches(order, pos, self.gb, self.rank, self.world)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                               pin_memory=self.pin, persistent_workers=False))

    def next(self) -> torch.Tensor:
        if self._it is None or self.step % self.steps_per_epoch == 0:
            self._it = self._epoch_loader()
        batch = next(self._it)
        self.step += 1
        return batch["image"] if isinstance(batch, dict) else batch


# --------------------------------------------------------------------------- model
class Encoder(nn.Module):
    """Backbone + localizability head: what the EMA teacher copies."""

    def __init__(self, backbone: nn.Module, loc_head: LocalizabilityHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.loc_head = loc_head


class StudentNet(nn.Module):
    """Student backbone and the three heads, run in one ``forward`` (one DDP call per step).

    ``forward(inputs, project, compose, decompose)``: ``inputs`` maps names to image stacks
    ``N x 1 x S x S``; stacks of equal size share one backbone call. Returns the embeddings of
    every input, localizability logits (and the bottleneck embeddings they score, ``proj``) for the
    names in ``project``, the composition of the
    parts stack ``compose`` (``B*k2`` rows, sample-major) and the decomposition of ``decompose``.
    """

    def __init__(self, encoder: Encoder, comp_head: CompositionHead, dec_head: DecompositionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.comp_head = comp_head
        self.dec_head = dec_head

    def forward(self, inputs: dict[str, torch.Tensor], project: tuple[str, ...] = (),
                compose: str | None = None, decompose: str | None = None) -> dict[str, Any]:
        emb = embed_grouped(self.encoder.backbone, inputs)
        out: dict[str, Any] = {"emb": emb}
        if project:
            head = self.encoder.loc_head
            sizes = [len(emb[n]) for n in project]
            z = head.project(torch.cat([emb[n] for n in project]))
            out["proj"] = dict(zip(project, z.split(sizes), strict=True))
            out["logits"] = dict(zip(project, head.prototype_logits(z).split(sizes), strict=True))
        if compose is not None:
            k2 = self.comp_head.k2
            out["composed"] = self.comp_head(emb[compose].unflatten(0, (-1, k2)))
        if decompose is not None:
            out["decomposed"] = self.dec_head(emb[decompose])
        return out


def embed_grouped(backbone: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone embeddings of named stacks, one backbone call per distinct input size."""
    by_size: dict[tuple[int, ...], list[str]] = {}
    for name, x in inputs.items():
        by_size.setdefault(tuple(x.shape[1:]), []).append(name)
    emb: dict[str, torch.Tensor] = {}
    for names in by_size.values():
        out = backbone(torch.cat([inputs[n] for n in names]))
        emb.update(zip(names, out.split([len(inputs[n]) for n in names]), strict=True))
    return emb


def build_student(cfg: PretrainConfig) -> StudentNet:
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=1, **m.backbone_kwargs)
    d, k2 = backbone.embed_dim, cfg.views.k ** 2
    loc = LocalizabilityHead(d, m.out_dim, hidden=m.head_hidden, bottleneck=m.head_bottleneck,
                             nlayers=m.head_layers)
    return StudentNet(Encoder(backbone, loc), CompositionHead(d, k2),
                      DecompositionHead(d, k2, m.decomposition_norm))


# --------------------------------------------------------------------------- run dir
def prepare_run_dir(out: Path, cfg: PretrainConfig) -> list[str]:
    """Make ``out`` ready for a run; returns what it cleared from a folder without a checkpoint.

    A folder that holds only what a holons run writes but no checkpoint (and no export) is the
    trace of a run that stopped before its first checkpoint: there is nothing to resume or
    protect, so its leftovers are cleared and the folder is reused, with or without ``resume``.
    Any other non-empty folder is refused unless ``resume`` or ``overwrite``; ``overwrite``
    clears only what a holons run writes and refuses a folder holding anything else.
    """
    if out.exists() and not out.is_dir():
        raise HolonsError(f"run dir {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    checkpoints = list_checkpoints(out / "checkpoints")
    cleared: list[str] = []
    if entries and not checkpoints and set(entries) <= set(LEFTOVER_ENTRIES):
        cleared = entries
    elif entries and not cfg.resume:
        if not cfg.overwrite:
            if checkpoints:
                held = f"a checkpoint at step {checkpoints[-1][0]}"
            else:
                held = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise HolonsError(f"run dir {out} is not empty (it holds {held}); pass resume=true to continue "
                              "it or overwrite=true to start over")
        foreign = [e for e in entries if e not in RUN_ENTRIES]
        if foreign:
            raise HolonsError(f"run dir {out} holds files that are not from a holons run "
                              f"({foreign[0]}, ...); refusing to overwrite it")
        cleared = entries
    for e in cleared:
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    return [] if checkpoints else cleared


TENSORBOARD_INSTALL = "pip install 'holons[tensorboard]'"


def open_tensorboard(folder: Path, wanted: bool | None, announce: bool = True):
    """A ``SummaryWriter`` on ``folder``, or None.

    ``wanted``: the config's ``tensorboard`` (None: when installed, True: asked for, False: never).
    A missing package is one warning line naming the extra when TensorBoard was asked for, and
    nothing otherwise; a package that is installed but fails to import or to open the folder is
    one warning line either way. ``announce=False`` keeps a reopened logger quiet (resume).
    """
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "tensorboard"
        if announce and missing and wanted:
            log.warning("tensorboard: true, but the tensorboard package is not installed: no TensorBoard "
                        "events (%s to write them, or set tensorboard=false)", TENSORBOARD_INSTALL)
        elif announce and not missing:
            log.warning("TensorBoard is installed but cannot be imported, no TensorBoard events: %s: %s",
                        type(e).__name__, " ".join(str(e).split()))
        return None
    try:
        return SummaryWriter(str(folder))
    except Exception as e:
        if announce:
            log.warning("cannot write TensorBoard events to %s: %s: %s", folder, type(e).__name__,
                        " ".join(str(e).split()))
        return None


class RunLogger:
    """train.log, metrics.jsonl and TensorBoard on rank 0; nothing elsewhere.

    ``tensorboard`` is the config's key (see ``open_tensorboard``); ``announce=False`` when the
    logger is reopened within one run, so that a TensorBoard warning is said once per run.
    """

    def __init__(self, out: Path, active: bool, resume_step: int | None, echo: int = logging.INFO,
                 tensorboard: bool | None = None, announce: bool = True) -> None:
        self.active = active
        self.metrics_path = out / "metrics.jsonl"
        self._handlers: list[logging.Handler] = []
        self.tb = None
        log.setLevel(logging.INFO)
        log.propagate = False
        if not active:
            return
        if resume_step is not None and self.metrics_path.exists():
            self._truncate_metrics(resume_step)
        file_handler = logging.FileHandler(out / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handlers.append(file_handler)
        stream = logging.StreamHandler(sys.stderr)  # INFO lines, or only warnings under a progress bar
        stream.setLevel(echo)
        stream.setFormatter(logging.Formatter("%(message)s"))
        self._handlers.append(stream)
        for h in self._handlers:
            log.addHandler(h)
        self.tb = open_tensorboard(out / "tb", tensorboard, announce)

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines written after the checkpoint being resumed (they will be written again)."""
        from holons.files import atomic_write

        keep = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    keep.append(line)
        with atomic_write(self.metrics_path, "w") as f:
            f.write("".join(x + "\n" for x in keep))

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        for h in self._handlers:
            log.removeHandler(h)
            h.close()
        self._handlers = []
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# --------------------------------------------------------------------------- trainer
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


def _split_views(x: torch.Tensor) -> list[torch.Tensor]:
    """``B x V x K`` -> V tensors ``B x K``."""
    return list(x.unbind(1))


def concat_views(groups: list[Views]) -> Views:
    """One ``Views`` from views of consecutive batch slices (partner indices shifted by slice)."""
    if len(groups) == 1:
        return groups[0]
    offsets, n = [], 0
    for v in groups:
        offsets.append(n)
        n += v.batch_size

    def cat(name: str) -> torch.Tensor | None:
        items = [getattr(v, name) for v in groups]
        if any(i is None for i in items):
            return None
        if name == "partner":
            items = [p + o for p, o in zip(items, offsets, strict=True)]
        return torch.cat(items)

    first = groups[0]
    kwargs = {f: cat(f) for f in ("whole", "whole_box", "global_crops", "global_boxes", "local_crops",
                                   "local_boxes", "parts", "part_boxes", "global_angles", "local_angles",
                                   "partner", "global_lambda", "local_lambda", "part_swap")}
    return Views(mode=first.mode, level=first.level, k=first.k, local_part_index=first.local_part_index,
                 **kwargs)


class Trainer:
    """State and step logic of one pretraining run (see ``pretrain``)."""

    def __init__(self, cfg: PretrainConfig, out: Path, info: du.DistInfo) -> None:
        self.cfg, self.out, self.info = cfg, out, info
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
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.optim.weight_decay),
                                           lr=0.0, betas=tuple(cfg.optim.betas))
        self.views = ViewGenerator(cfg.views)
        self.dataset = build_dataset(cfg)
        self.steps_per_epoch = len(self.dataset) // cfg.data.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {len(self.dataset)} "
                              "training images")
        self.segments = plan_segments(cfg, self.steps_per_epoch)
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
    def _branches(self, mode: str) -> tuple[bool, bool]:
        """(composition, decomposition) active in this mode."""
        pw = mode == "part_whole"
        return pw and self.cfg.loss.w_comp > 0, pw and self.cfg.loss.w_dec > 0

    def enter_stage(self, mode: str) -> None:
        """Make only the active heads trainable and (re)wrap the student for DDP accordingly."""
        if mode == self._stage_mode:
            return
        comp, dec = self._branches(mode)
        self.student.comp_head.requires_grad_(comp)
        self.student.dec_head.requires_grad_(dec)
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.student, device_ids=ids)
        self._stage_mode = mode

    # ------------------------------------------------------------------ one step
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.cfg.data.mean) / self.cfg.data.std

    def make_views(self, images: torch.Tensor, seg: Segment, step: int) -> Views:
        """Views of the local batch, slice by slice, each slice from its own seeded generator."""
        per_rank = self.view_groups // self.info.world_size
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        out = []
        for i, chunk in enumerate(images.chunk(per_rank)):
            slice_id = self.info.rank * per_rank + i
            g = torch.Generator(device=gen_device).manual_seed(_seed(self.cfg.seed, step, slice_id, 0x71E5))
            out.append(self.views(chunk, level=seg.level, generator=g, mode=seg.mode))
        return concat_views(out)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def losses(self, v: Views, seg: Segment
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        """Total loss, its terms and diagnostics, and the teacher logits for the centre update."""
        cfg = self.cfg
        b = v.batch_size
        flat = lambda x: self._normalize(x.flatten(0, 1))  # noqa: E731  (B, V, C, S, S) -> (B*V, C, S, S)
        n_g, n_l = v.global_crops.shape[1], v.local_crops.shape[1]
        box_mix = v.partner is not None and v.part_swap is None
        terms: dict[str, torch.Tensor] = {}
        if seg.mode == "localizability":
            with torch.no_grad(), self._autocast():
                t_emb = self.teacher.backbone(flat(v.global_crops))
                t_logits = self.teacher.loc_head(t_emb).float().unflatten(0, (b, n_g))
            with self._autocast():
                s = self.model({"global": flat(v.global_crops), "local": flat(v.local_crops)},
                               project=("global", "local"))
            s_views = (_split_views(s["logits"]["global"].float().unflatten(0, (b, n_g)))
                       + _split_views(s["logits"]["local"].float().unflatten(0, (b, n_l))))
            t_views = _split_views(t_logits)
            probs = [self.loc_loss.teacher_probs(t) for t in t_views]
            pairs = [(si, ti) for si in range(n_g + n_l) for ti in range(n_g) if si != ti]
            if box_mix:  # mixed local crops: each (crop, teacher view) pair gets its own mixed target
                mixed_pairs = []
                for si, ti in pairs:
                    if si >= n_g:
                        probs.append(mix_teacher_probs(probs[ti], v.partner, v.local_lambda[:, si - n_g]))
                        ti = len(probs) - 1
                    mixed_pairs.append((si, ti))
                pairs = mixed_pairs
            out = self.loc_loss(s_views, teacher_probs=probs, pairs=pairs)
            terms["loc"] = out.loss
            total = cfg.loss.w_loc * out.loss
            teacher_logits = t_views
        else:
            comp_on, dec_on = self._branches(seg.mode)
            need_parts = dec_on or bool((v.local_part_index >= 0).any())
            k2 = v.n_parts
            with torch.no_grad(), self._autocast():
                t_in = {"whole": self._normalize(v.whole)}
                if need_parts:
                    t_in["parts"] = flat(v.parts)
                t_emb = embed_grouped(self.teacher.backbone, t_in)
                t_whole_logits = self.teacher.loc_head(t_emb["whole"]).float()
                t_parts_logits = (self.teacher.loc_head(t_emb["parts"]).float().unflatten(0, (b, k2))
                                  if need_parts else None)
            s_in = {"global": flat(v.global_crops), "local": flat(v.local_crops)}
            if comp_on:
                s_in["parts"] = flat(v.parts)
            if dec_on:
                s_in["whole"] = self._normalize(v.whole)
            with self._autocast():
                s = self.model(s_in, project=("global", "local"), compose="parts" if comp_on else None,
                               decompose="whole" if dec_on else None)
            s_views = (_split_views(s["logits"]["global"].float().unflatten(0, (b, n_g)))
                       + _split_views(s["logits"]["local"].float().unflatten(0, (b, n_l))))
            teacher_logits = [t_whole_logits]
            probs = [self.loc_loss.teacher_probs(t_whole_logits)]
            if t_parts_logits is not None:
                teacher_logits += _split_views(t_parts_logits)
                probs += [self.loc_loss.teacher_probs(t) for t in _split_views(t_parts_logits)]
            targets = [0] * n_g + [0 if int(p) < 0 else 1 + int(p) for p in v.local_part_index.tolist()]
            if box_mix:
                lams = torch.cat([v.global_lambda, v.local_lambda], dim=1)
                for si in range(n_g + n_l):
                    probs.append(mix_teacher_probs(probs[targets[si]], v.partner, lams[:, si]))
                    targets[si] = len(probs) - 1
            out = self.loc_loss(s_views, teacher_probs=probs, pairs=list(enumerate(targets)))
            terms["loc"] = out.loss
            total = cfg.loss.w_loc * out.loss
            if comp_on:
                terms["comp"] = composition_loss(s["composed"], t_emb["whole"], cfg.loss.embed_reduction)
                total = total + cfg.loss.w_comp * terms["comp"]
            if dec_on:
                t_parts = t_emb["parts"].unflatten(0, (b, k2))
                terms["dec"] = decomposition_loss(s["decomposed"], t_parts, cfg.loss.embed_reduction)
                total = total + cfg.loss.w_dec * terms["dec"]
        if cfg.loss.w_koleo > 0:  # spread the student's global-crop embeddings within the batch
            z = s["proj"]["global"].unflatten(0, (b, n_g))
            terms["koleo"] = torch.stack([koleo_loss(z[:, j]) for j in range(n_g)]).mean()
            total = total + cfg.loss.w_koleo * terms["koleo"]
        diag = {"teacher_entropy": out.teacher_entropy, "teacher_batch_entropy": out.teacher_batch_entropy,
                "center_norm": out.center_norm}
        return total, {**{f"loss_{k}": t for k, t in terms.items()}, **diag}, teacher_logits

    def train_step(self, images: torch.Tensor, seg: Segment, stop_flag: bool
                   ) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns the (rank-averaged) metrics and whether any rank asked to stop."""
        cfg, step = self.cfg, self.step
        torch.manual_seed(_seed(cfg.seed, step, self.info.rank, 0x6A0B))
        timer = _Timer(self.device)
        images = images.to(self.device, non_blocking=True)
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
                        "comp_head": s.comp_head.state_dict(), "dec_head": s.dec_head.state_dict()},
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
            save_checkpoint(self.state(), self.out / "checkpoints", self.step,
                            keep_last=self.cfg.keep_checkpoints, keep_steps=keep)
        du.barrier()


class _Timer:
    """Wall-clock split of a step; synchronizes CUDA so that the split is real."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now

    def splits(self) -> dict[str, float]:
        return {f"time_{k}": self.laps.get(k, 0.0) for k in ("transfer", "views", "fwd_bwd", "update")}


def _resolve_config(config: PretrainConfig | str | Path | dict,
                    overrides: list[str] | None) -> PretrainConfig:
    """defaults < config (YAML path, dataclass or dict) < ``key.sub=value`` overrides."""
    if isinstance(config, (str, Path)):
        return load_config(PretrainConfig, config, overrides)
    from holons.config import _merge, parse_overrides

    base = to_dict(config) if isinstance(config, PretrainConfig) else dict(config)
    return load_config(PretrainConfig, None, _merge(base, parse_overrides(overrides)))


def _record(step: int, seg: Segment, window: list[dict[str, Any]], gb: int, nan_steps: int,
            steps_per_epoch: int) -> dict[str, Any]:
    """One metrics.jsonl line: the mean of each value over the finite steps of the window."""
    finite = [w for w in window if w["finite"]] or window
    keys = [k for k in finite[-1] if k not in ("finite",)]
    rec: dict[str, Any] = {"step": step, "epoch": round(step / steps_per_epoch, 4), "stage": seg.stage,
                           "level": seg.level, "mode": seg.mode}
    for k in keys:
        vals = [w[k] for w in finite if k in w]
        mean = float(np.mean(vals)) if vals else math.nan
        rec[k] = mean if math.isfinite(mean) else None  # JSON has no NaN; null marks a non-finite value
    rec["lr"], rec["wd"], rec["momentum"] = window[-1]["lr"], window[-1]["wd"], window[-1]["momentum"]
    step_time = sum(w["time_data"] + w["time_views"] + w["time_fwd_bwd"] + w["time_update"] for w in window)
    rec["img_per_s"] = gb * len(window) / step_time if step_time > 0 else None
    rec["nan_steps"] = nan_steps
    return rec


def _summary(rec: dict[str, Any]) -> str:
    """One log line: the loss terms, lr, teacher entropy and throughput of a metrics record."""
    def fmt(v: Any, spec: str) -> str:
        return "nan" if v is None else format(v, spec)

    keys = ["loss"] + [k for k in rec if k.startswith("loss_")]
    parts = [f"{k.removeprefix('loss_')} {fmt(rec[k], '.4f')}" for k in keys]
    parts += [f"lr {fmt(rec['lr'], '.2e')}", f"entropy {fmt(rec.get('teacher_entropy'), '.3f')}",
              f"{fmt(rec.get('img_per_s'), '.1f')} img/s"]
    return " ".join(parts)


def pretrain(config: PretrainConfig | str | Path | dict, out: str | Path, overrides: list[str] | None = None,
             *, progress: bool | None = None) -> PretrainResult:
    """Pretrain a foundation backbone; see the module docstring for the run dir.

    ``config`` is a YAML path, a ``PretrainConfig`` or a plain dict; ``overrides`` are
    ``key.sub=value`` strings. Under ``torchrun`` every rank calls this; only rank 0 writes.
    ``progress``: tqdm bar on rank 0 (default: when stderr is a terminal).
    """
    cfg = _resolve_config(config, overrides)
    validate(cfg)
    out = Path(out)
    info = du.init_distributed(cfg.device)
    try:
        return _run(cfg, out, info, progress)
    finally:
        if info.distributed:
            du.cleanup()


def _run(cfg: PretrainConfig, out: Path, info: du.DistInfo, progress: bool | None) -> PretrainResult:
    cleared = prepare_run_dir(out, cfg) if info.is_main else []
    du.barrier()
    resume_path = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    show_bar = info.is_main and (sys.stderr.isatty() if progress is None else progress)
    echo = logging.WARNING if show_bar else logging.INFO
    logger = RunLogger(out, info.is_main, None, echo, cfg.tensorboard)
    try:
        trainer = Trainer(cfg, out, info)
        if resume_path is not None:
            # on the CPU: load_state copies weights to the device, AdamW keeps its step counters
            # on the CPU as in an uninterrupted run, and the RNG setters take CPU tensors only
            state = load_checkpoint(resume_path, map_location="cpu")
            trainer.load_state(state)
            logger.close()
            logger = RunLogger(out, info.is_main, trainer.step, echo, cfg.tensorboard, announce=False)
            log.info("resumed from %s at step %d (stage %d, level %d)", resume_path.name, trainer.step,
                     state["stage"], state["level"])
            changed = _changed_keys(state["config"], to_dict(cfg))
            if changed:
                log.warning("the config differs from the checkpoint's in %s; the resumed run will not "
                            "match an uninterrupted one", ", ".join(changed))
        else:
            # resume=true on a new or empty folder is the ordinary first run (the demo always passes
            # it): nothing to say. Leftovers of a run that stopped before its first checkpoint are.
            if cleared:
                log.info("run dir %s had no checkpoint (a run that stopped before its first one); cleared "
                         "its leftovers (%s) and starting a new run", out, ", ".join(cleared))
            if cfg.init_from:
                trainer.init_from(cfg.init_from)
                log.info("initialized weights from %s", cfg.init_from)
        if info.is_main:
            save_config(cfg, out / "config.yaml")
        return _loop(trainer, logger, show_bar)
    finally:
        logger.close()


_RUN_CONTROL_KEYS = {"resume", "overwrite", "init_from", "max_steps", "log_every", "checkpoint_every",
                     "keep_checkpoints", "debug", "max_nan_steps", "tensorboard"}


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (run-control keys ignored)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in _RUN_CONTROL_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def _loop(tr: Trainer, logger: RunLogger, show_bar: bool) -> PretrainResult:
    cfg, info = tr.cfg, tr.info
    skipped = getattr(tr.dataset, "skipped", 0)
    log.info("pretrain: method %s, %s, %d images (%d unreadable skipped), global batch %d on %d rank(s), "
             "%d steps/epoch, %d steps in %d segments, device %s, amp %s", cfg.method, cfg.model.backbone,
             len(tr.dataset), skipped, cfg.data.batch_size, info.world_size, tr.steps_per_epoch,
             tr.total_steps, len(tr.segments), tr.device, tr.amp_dtype or "off")
    end = tr.total_steps if cfg.max_steps is None else min(tr.total_steps, cfg.max_steps)
    boundaries = {s.end for s in tr.segments}
    stream = BatchStream(tr.dataset, cfg.data.batch_size, cfg.seed, info.rank, info.world_size,
                         cfg.data.num_workers, tr.step, tr.device.type == "cuda")
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
                last = _record(tr.step, seg, window, cfg.data.batch_size, tr.nan_steps, tr.steps_per_epoch)
                logger.metrics(last)
                log.info("step %d/%d %s", tr.step, tr.total_steps, _summary(last))
                window = []
            if stop_any:
                tr.save(boundaries)
                status = "terminated"
                signum = stop.signum or signal.SIGTERM  # another rank's signal reaches this one as a flag
                log.info("%s: checkpoint written at step %d; exiting cleanly (resume with resume=true)",
                         signal.Signals(signum).name, tr.step)
                break
            if tr.step % cfg.checkpoint_every == 0 or tr.step in boundaries or tr.step == end:
                tr.save(boundaries)
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
