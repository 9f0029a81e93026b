"""``holons distill``: learn ``ipc`` synthetic images per class, write them, evaluate them.

:func:`distill` has the shape of every holons trainer: ``distill(config, *, data, out, overrides,
resume, overwrite)`` takes a YAML path, a dict or a :class:`DistillConfig` (``None``: defaults) and
returns a :class:`DistillResult`. The run folder holds ``config.yaml``, ``metrics.jsonl`` (the
matching loss), ``checkpoints/distill.pt`` (the synthetic images and their optimizer, every
``match.checkpoint_every`` iterations and on SIGTERM / SIGINT), ``distilled/`` (PNGs +
``manifest.csv``, see :mod:`~holons.finetune.distill.data`) and ``distill.json`` (the summary and
the evaluation).

Every iteration draws its network initialisation and its real batches from generators seeded by
``(match.seed, iteration)``, so ``resume=True`` continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from holons.config import resolve_config, save_config, to_dict
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.distill.config import DistillConfig
from holons.finetune.distill.convnet import ConvNet
from holons.finetune.distill.data import RealSet, load_real_set, quantize, write_distilled
from holons.finetune.distill.evaluate import SCALE, SHIFT, evaluate_arms, mirrors
from holons.finetune.distill.matching import class_poses, dm_loss, gm_loss, matching_views
from holons.finetune.distill.trajectory import train_expert, trajectory_loss
from holons.runs import prepare_run, resolve_device
from holons.signals import StopSignal

CHECKPOINT = Path("checkpoints") / "distill.pt"
DISTILLED_DIR = "distilled"
SUMMARY_FILE = "distill.json"
EXPERTS_FILE = "experts.pt"
LOG_EVERY = 10


class DistillInterrupted(HolonsError):
    """Stopped by SIGTERM / SIGINT after checkpointing; ``resume=True`` continues."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path) -> None:
        self.signum = signum
        super().__init__(f"interrupted at iteration {iteration}; state saved to {checkpoint}; continue with "
                         "the same command plus --resume")


@dataclass
class DistillResult:
    """What a run left: the run folder, the distilled set's manifest, the summary (losses, evaluation)."""

    out: Path
    manifest: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """Accuracy per arm (distilled / random / full) over seeds, when evaluated."""
        return self.summary.get("evaluation")


def distill(config: DistillConfig | str | Path | dict | None = None, *, data: str | Path, out: str | Path,
            overrides: list[str] | dict | None = None, resume: bool = False, overwrite: bool = False,
            progress: bool | None = None) -> DistillResult:
    """Distil the real set at ``data`` (a manifest CSV or a set folder) into ``out/distilled``,
    evaluate it when ``evaluate.seeds`` is not empty; raises :class:`DistillInterrupted` (state saved)
    on SIGTERM / SIGINT."""
    cfg = resolve_config(DistillConfig, config, overrides)
    out = Path(out)
    prepare_run(out, resume=resume, overwrite=overwrite, leftovers=(EXPERTS_FILE,),
                results=(DISTILLED_DIR, SUMMARY_FILE))
    saved = out / "config.yaml"
    if resume and saved.is_file():
        before = resolve_config(DistillConfig, saved)
        if {k: v for k, v in to_dict(before).items() if k != "evaluate"} != \
                {k: v for k, v in to_dict(cfg).items() if k != "evaluate"}:
            raise HolonsError(f"the config differs from the one of the run in {out}; resume it unchanged "
                              "(only evaluate.* may change)")
    save_config(cfg, saved)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    real = load_real_set(cfg.data, data, progress=show)
    result = run_distillation(cfg, real, out, resume=resume, progress=show)
    result.summary["data"] = str(data)
    _write_summary(out, result.summary)
    return result


def initial_images(real: RealSet, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class: real ones of the class (``real``: random, ``kmeans``: one per k-means
    cluster; seeded; drawn with replacement when the class has fewer) or uniform noise; float
    ``C*ipc x 1 x S x S`` and their labels."""
    m = cfg.match
    gen = torch.Generator().manual_seed(m.seed)
    images, labels = [], []
    for c, idx in enumerate(real.class_indices()):
        if len(idx) == 0:
            raise HolonsError(f"class {real.class_names[c]!r} has no training images")
        if m.init == "noise":
            images.append(torch.rand(m.ipc, *real.train_x.shape[1:], generator=gen))
        else:
            if len(idx) < m.ipc:
                pick = torch.randint(len(idx), (m.ipc,), generator=gen)
            elif m.init == "kmeans":
                pick = kmeans_representatives(real.train_x[idx], m.ipc, seed=m.seed)
            else:
                pick = torch.randperm(len(idx), generator=gen)[:m.ipc]
            images.append(real.train_x[idx[pick]].float() / 255.0)
        labels.append(torch.full((m.ipc,), c, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def kmeans_representatives(images: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` distinct images of ``images`` (``N x ...``, ``N >= k``): for each centre of a
    k-means clustering of the flattened pixels (scikit-learn, seeded), the nearest image not taken yet.

    Why pixels and not a network's features: on pki-3's validation split (32 px chromosomes, 10 per
    type, a ConvNet-3 trained on the pick, 3 seeds) centres in pixel space gave 49.5 +- 1.3 % against
    45.0 +- 4.0 % for random picks, centres in a freshly initialised ConvNet's features 47.9 +- 2.0 %
    and in a ConvNet trained on all training images 44.4 +- 4.8 % (typical but alike picks); the
    centres themselves (blurred means) 31.6 %.
    """
    from sklearn.cluster import KMeans

    if len(images) < k:
        raise ValueError(f"{len(images)} images cannot give {k} distinct representatives")
    flat = images.reshape(len(images), -1).float().numpy() / 255.0
    centres = KMeans(n_clusters=k, n_init=3, random_state=int(seed)).fit(flat).cluster_centers_
    taken: list[int] = []
    for centre in centres:
        order = np.argsort(((flat - centre) ** 2).sum(1))
        taken.append(next(int(i) for i in order if int(i) not in taken))
    return torch.tensor(taken)


def real_batch(real: RealSet, per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_class`` random training images of every class (float) and their labels."""
    idx = torch.cat([i[torch.randperm(len(i), generator=gen)[:per_class]] for i in real.class_indices()])
    return real.train_x[idx].float() / 255.0, real.train_y[idx]


def _iteration_seed(seed: int, iteration: int) -> int:
    return (int(seed) * 1_000_003 + int(iteration)) % (2 ** 63)


def run_distillation(cfg: DistillConfig, real: RealSet, out: str | Path, *, resume: bool = False,
                     progress: bool = False) -> DistillResult:
    """The matching loop on a loaded real set, then writing and evaluating the distilled set."""
    out, m = Path(out), cfg.match
    device = resolve_device(cfg.device)
    hflip = mirrors(cfg, real)
    t0 = time.perf_counter()
    experts = _expert_trajectories(cfg, real, out, device, hflip, progress) if m.method == "mtt" else None
    start_images, labels = initial_images(real, cfg)
    support = (start_images > 0).float().to(device) if m.keep_background else None
    syn = start_images.clone().to(device).requires_grad_(True)
    labels = labels.to(device)
    groups = [{"params": [syn]}]
    syn_lr = None  # trajectory matching's learned step size, one more parameter of the same optimizer
    if m.method == "mtt":
        syn_lr = torch.tensor(float(cfg.experts.lr), device=device, requires_grad=True)
        groups.append({"params": [syn_lr], "lr": m.mtt_lr_lr})
    opt = torch.optim.SGD(groups, lr=m.lr, momentum=0.5)
    start = 0
    if resume and (out / CHECKPOINT).is_file():
        state = _load_checkpoint(out / CHECKPOINT)
        with torch.no_grad():
            syn.copy_(state["syn"])
            if syn_lr is not None:
                syn_lr.fill_(float(state["syn_lr"]))
        opt.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        _truncate_log(out / "metrics.jsonl", start)
    loss_fn = dm_loss if m.method == "dm" else gm_loss
    net = _gm_net_at(cfg, real, device, start) if m.method == "gm" and start % m.gm_inner_steps else None

    def save(iteration: int) -> None:
        _save_checkpoint(out / CHECKPOINT, syn, opt, iteration, syn_lr=syn_lr)

    with StopSignal() as stop, open(out / "metrics.jsonl", "a") as log:
        bar = tqdm(range(start, m.iterations), desc=f"distill ({m.method}{', fyi' if m.fyi else ''})",
                   initial=start, total=m.iterations, disable=not progress)
        for it in bar:
            if stop.requested:
                save(it)
                raise DistillInterrupted(stop.signum or 15, it, out / CHECKPOINT)
            torch.manual_seed(_iteration_seed(m.seed, it))
            gen = torch.Generator().manual_seed(_iteration_seed(m.seed, it) + 1)
            if m.method == "dm" or net is None or (m.method == "gm" and it % m.gm_inner_steps == 0):
                net = _fresh_net(cfg, real, device, it)
            if m.method == "mtt":
                loss = _trajectory_loss(cfg, net, experts, syn, labels, syn_lr, gen, hflip)
            else:
                x, y = real_batch(real, m.real_batch, gen)
                x, y = x.to(device), y.to(device)
                poses = class_poses(real.num_classes, gen, translate=SHIFT, scale=SCALE,
                                    flip=hflip) if m.augment else None
                loss = loss_fn(net, x, y, syn, labels, real.num_classes, fyi=m.fyi, poses=poses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                syn.clamp_(0.0, 1.0)
                if syn_lr is not None:
                    syn_lr.clamp_(min=1e-6)
                if support is not None:
                    syn.mul_(support)
            if m.method == "gm":
                _train_step(net, x, y)
            if it % LOG_EVERY == 0 or it == m.iterations - 1:
                record = {"iteration": it, "loss": loss.item()}
                if syn_lr is not None:
                    record["syn_lr"] = syn_lr.item()
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.4g}")
            if (it + 1) % m.checkpoint_every == 0:
                save(it + 1)
    save(m.iterations)
    distilled = quantize(syn)
    change = float((distilled.float() / 255.0 - start_images).abs().mean())
    manifest = write_distilled(distilled, labels.cpu(), real.class_names, real.kind, out / DISTILLED_DIR)
    summary = {
        "kind": real.kind, "classes": real.class_names, "ipc": m.ipc, "method": m.method, "fyi": m.fyi,
        "iterations": m.iterations, "mean_abs_change_from_init": round(change, 5),
        "train_images": len(real.train_x), "test_images": len(real.test_x),
        "real_set": real.info, "loss": _loss_summary(out / "metrics.jsonl"),
        "distill_seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg),
    }
    if syn_lr is not None:
        summary["syn_lr"] = syn_lr.item()
    if cfg.evaluate.seeds:
        summary["evaluation"] = evaluate_arms(real, distilled, labels.cpu(), cfg, device, progress=progress)
    _write_summary(out, summary)
    return DistillResult(out=out, manifest=manifest, summary=summary)


def _expert_trajectories(cfg: DistillConfig, real: RealSet, out: Path, device: torch.device, hflip: bool,
                         progress: bool) -> list[torch.Tensor]:
    """Trajectory matching's experts (:func:`~holons.finetune.distill.trajectory.train_expert`), seeded
    from ``match.seed``; trained once and kept in ``out/experts.pt``."""
    path = out / EXPERTS_FILE
    if path.is_file():
        return _load_checkpoint(path)["trajectories"]
    trajectories = [train_expert(real, cfg, seed=_iteration_seed(cfg.match.seed, -1 - k), hflip=hflip,
                                 device=device, progress=progress) for k in range(cfg.experts.count)]
    with atomic_write(path, "wb") as f:
        torch.save({"trajectories": trajectories}, f)
    return trajectories


def _trajectory_loss(cfg: DistillConfig, net: ConvNet, experts: list[torch.Tensor], syn: torch.Tensor,
                     labels: torch.Tensor, syn_lr: torch.Tensor, gen: torch.Generator,
                     hflip: bool) -> torch.Tensor:
    """One trajectory-matching loss: a random expert, a random start epoch, the synthetic views."""
    m = cfg.match
    expert = experts[int(torch.randint(len(experts), (1,), generator=gen))]
    t = int(torch.randint(m.mtt_max_start, (1,), generator=gen))
    views, view_labels = matching_views(syn, labels, m.fyi)
    start, target = expert[t].to(syn.device), expert[t + m.mtt_span].to(syn.device)
    return trajectory_loss(net, views, view_labels, start, target, syn_lr, steps=m.mtt_syn_steps,
                           batch_size=m.mtt_batch or len(views), generator=gen, hflip=hflip)


def _fresh_net(cfg: DistillConfig, real: RealSet, device: torch.device, iteration: int) -> ConvNet:
    net = ConvNet(real.num_classes, size=real.train_x.shape[-1], width=cfg.net.width, depth=cfg.net.depth)
    net = net.to(device).train()
    if cfg.match.method == "dm":
        for p in net.parameters():
            p.requires_grad_(False)
    return net


def _gm_net_at(cfg: DistillConfig, real: RealSet, device: torch.device, iteration: int) -> ConvNet:
    """Gradient matching's network as it stood before ``iteration``: rebuilt at the start of its cycle
    and trained on the same real batches again (it never sees the synthetic images), so a resumed run
    matches with the network an uninterrupted one would have."""
    first = iteration - iteration % cfg.match.gm_inner_steps
    for it in range(first, iteration):
        torch.manual_seed(_iteration_seed(cfg.match.seed, it))
        gen = torch.Generator().manual_seed(_iteration_seed(cfg.match.seed, it) + 1)
        if it == first:
            net = _fresh_net(cfg, real, device, it)
        x, y = real_batch(real, cfg.match.real_batch, gen)
        _train_step(net, x.to(device), y.to(device))
    return net


def _train_step(net: ConvNet, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01) -> None:
    """One SGD step of gradient matching's network on the real batch."""
    net.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def _save_checkpoint(path: Path, syn: torch.Tensor, opt: torch.optim.Optimizer, iteration: int, *,
                     syn_lr: torch.Tensor | None = None) -> None:
    state = {"syn": syn.detach().cpu(), "optimizer": opt.state_dict(), "iteration": int(iteration),
             "torch": str(torch.__version__)}
    if syn_lr is not None:
        state["syn_lr"] = float(syn_lr.item())
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: the user must see which one
        raise HolonsError(f"cannot load checkpoint {path}: {type(e).__name__}") from e


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop loss records at or after ``iteration`` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line and json.loads(line)["iteration"] < iteration]
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


def _loss_summary(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    if not records:
        return {}
    return {"first": records[0]["loss"], "last": records[-1]["loss"], "records": len(records)}


def _write_summary(out: Path, summary: dict) -> None:
    with atomic_write(out / SUMMARY_FILE, "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
