"""Benchmark: the cost structure of a pretraining step (issue 4, section 8).

Four measurements, each against a reference taken in the same run:

- (a) step-time breakdown: the real trainer (``holons.ssl.trainer.pretrain``) runs a few steps of
  ``cpu_tiny`` in a child process on a phantom cache built in a temporary folder (synthetic DICOM
  radiographs -> ``index_archive`` -> ``build_cache``); its ``metrics.jsonl`` gives the split of each
  step into data / view generation / forward-backward / update. Target: views <= 10 % of a step.
- (b) heads + losses + EMA overhead: on ONE batch of views, a full adamv2 part-whole training step
  (``Trainer.train_step`` with its view generation short-circuited to those views) against a step
  that only runs the student backbone forward + backward on the same view tensors (the sum of the
  embeddings as loss). Target: overhead <= 15 %. The overhead is split into teacher forward,
  student heads + losses (+ their backward), optimizer (clip + AdamW + centre) and EMA update.
- (c) batched view generation (``holons.anatomy.ViewGenerator``) against a per-view
  torchvision-transforms pipeline producing the same views (whole, 1 global crop, 8 nested local
  crops, k x k = 4 parts; random-resized crop + rotation + window/level + gamma + blur per view),
  in a Python loop over samples and views. Target >= 5x; at cpu_tiny sizes (64 / 32 px from 128 px
  images) and paper sizes (224 / 96 px from 256 px images).
- (d) peak memory of the cpu_tiny run of (a): max RSS (``resource.getrusage``) of the child process
  on CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
- (e) the bare backbone's achieved TFLOP/s against the measured matmul peak, and (f) samples/s of
  localizability and part-whole steps with each ``perf`` knob on / off (``step_throughput.py``;
  opt-in: ``--only ef``). Issue 22's device run: ``tools/device_bench_pretrain.sh``.

Timings are medians over repeats. All timed work uses ``--threads`` torch threads (default 1: on
a busy shared 2-core VM two threads spin-wait on each other and steps run 3-5x slower and erratic;
pass ``--threads 0`` for torch's default on a dedicated machine). Run::

    .venv/bin/python benchmarks/bench_pretrain.py                  # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_pretrain.py --device cuda --n-images 256 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import step_throughput
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
VIEWS_TARGET, OVERHEAD_TARGET, SPEEDUP_TARGET = 0.10, 0.15, 5.0


# --------------------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _round_times(fns: dict[str, Any], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, list[float]]:
    """Wall times of each callable per round, the callables interleaved in every round (shared-machine
    noise then hits all of them alike, and ratios can be taken round by round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return times


def _median_times(fns: dict[str, Any], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each callable (see ``_round_times``)."""
    return {name: statistics.median(t) for name, t in _round_times(fns, device, repeats, warmup).items()}


def make_phantom_cache(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` synthetic DICOM radiographs -> manifest -> cache at ``size`` px; returns the cache folder."""
    from holons.data.cache import build_cache
    from holons.data.index import index_archive
    from holons.data.synthetic.radiographs import generate_radiographs

    generate_radiographs(root / "phantoms", n=n, seed=seed, size=max(size, 128), formats=("dicom",),
                         progress=False)
    index_archive(root / "phantoms" / "dicom", root / "manifest.parquet", secret=b"bench", progress=False)
    build_cache(root / "manifest.parquet", root / "cache", size=size, progress=False)
    return root / "cache"


def _load_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------- (a) + (d): the real trainer
def _train_config(base: dict[str, Any], cache: Path, device: str, steps_per_level: int,
                  batch: int | None) -> dict[str, Any]:
    """cpu_tiny with its curriculum shortened to ``steps_per_level`` steps per (stage, level)."""
    cfg = copy.deepcopy(base)
    cfg["device"] = device
    cfg["data"]["cache_dir"] = str(cache)
    if batch is not None:
        cfg["data"]["batch_size"] = batch
    for stage in cfg["curriculum"]["stages"]:
        stage.pop("epochs_per_level", None)
        stage["steps_per_level"] = steps_per_level
    cfg.update(log_every=1, checkpoint_every=10**9, max_steps=None)
    return cfg


def run_trainer_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: run ``pretrain`` and report its metrics, wall time and peak memory."""
    from holons.ssl.trainer import pretrain

    device = _device(spec["config"]["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = pretrain(spec["config"], spec["out"], progress=False)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "wall_s": wall, "steps": result.step, "status": result.status,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024,
        "records": [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()],
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


SPLITS = ("time_data", "time_views", "time_fwd_bwd", "time_update")


def _breakdown(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each split over the steps of ``records``, and its fraction of the median step."""
    med = {k: statistics.median(r[k] for r in records) for k in SPLITS}
    step = statistics.median(sum(r[k] for k in SPLITS) for r in records)
    total = sum(med.values())
    return {"steps": len(records), "step_s": step,
            **{k.removeprefix("time_") + "_s": v for k, v in med.items()},
            **{k.removeprefix("time_") + "_frac": v / total for k, v in med.items()}}


def bench_breakdown(args: argparse.Namespace, cache: Path, work: Path) -> dict[str, Any]:
    """(a) and (d): a short cpu_tiny curriculum through the real trainer, in a child process."""
    cfg = _train_config(_load_yaml(args.config), cache, args.device, args.steps_per_level, args.batch)
    spec = {"config": cfg, "out": str(work / "run"), "threads": args.threads}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"the training child failed:\n{proc.stderr[-4000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [r for r in child["records"] if r["step"] > 1]  # step 1 pays one-off allocations
    by_mode = {mode: _breakdown([r for r in records if r["mode"] == mode])
               for mode in ("localizability", "part_whole") if any(r["mode"] == mode for r in records)}
    # cpu_tiny's real schedule: localizability 2 levels x 1 epoch, part-whole 2 levels x 2 epochs
    cfg_stages = _load_yaml(args.config)["curriculum"]["stages"]
    weight = {m: sum(len(s["levels"]) * s.get("epochs_per_level", 1.0) for s in cfg_stages if s["mode"] == m)
              for m in by_mode}
    wsum = sum(weight.values())
    weighted = {k: sum(weight[m] * by_mode[m][k] for m in by_mode) / wsum
                for k in ("step_s", "views_frac", "data_frac", "fwd_bwd_frac", "update_frac")}
    step_time_sum = sum(sum(r[k] for k in SPLITS) for r in child["records"])
    result = {
        "batch": cfg["data"]["batch_size"], "steps_run": child["steps"], "by_mode": by_mode,
        "schedule_weighted": weighted, "schedule_weights": weight,
        "pretrain_wall_s": child["wall_s"], "fixed_overhead_s": child["wall_s"] - step_time_sum,
        "memory": {k: v for k, v in child.items() if k.endswith("_mb")},
    }
    return result


# --------------------------------------------------------------------------- (b): overhead over the backbone
def bench_overhead(args: argparse.Namespace, cache: Path, work: Path) -> dict[str, Any]:
    """(b): one full adamv2 part-whole step vs the bare student backbone forward + backward, same views."""
    from holons.config import load_config
    from holons.ssl import distributed as du
    from holons.ssl.config import PretrainConfig, validate
    from holons.ssl.student import embed_grouped
    from holons.ssl.teacher import update_teacher
    from holons.ssl.trainer import Trainer

    overrides = {"device": args.device, "data": {"cache_dir": str(cache)}}
    if args.batch is not None:
        overrides["data"]["batch_size"] = args.batch
    cfg = load_config(PretrainConfig, args.config, overrides)
    validate(cfg)
    tr = Trainer(cfg, work / "overhead_run", du.init_distributed(cfg.device))
    device = tr.device
    seg = next(s for s in tr.segments if s.mode == "part_whole")
    b = cfg.data.batch_size
    items = [tr.dataset[i] for i in range(b)]
    images = torch.stack([x["image"] if isinstance(x, dict) else x for x in items]).to(device)
    views = tr.make_views(images, seg, seg.start)
    tr.make_views = lambda images, seg, step: views  # train_step now reuses these exact views
    norm = tr.normalize
    s_in = {"global": views.global_crops.flatten(0, 1), "local": views.local_crops.flatten(0, 1),
            "parts": views.parts.flatten(0, 1), "whole": views.whole}
    t_in = {"whole": views.whole, "parts": views.parts.flatten(0, 1)}
    backbone = tr.student.encoder.backbone
    splits: dict[str, list[float]] = {"fwd_bwd": [], "update": []}

    def full() -> None:
        tr.step = seg.start
        values, _ = tr.train_step(images, seg, False)
        splits["fwd_bwd"].append(values["time_fwd_bwd"])
        splits["update"].append(values["time_update"])

    def bare() -> None:
        tr.student.train()
        with tr.autocast():
            emb = embed_grouped(backbone, {k: norm(v) for k, v in s_in.items()})
            loss = sum(e.float().sum() for e in emb.values())
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def teacher_forward() -> None:
        with torch.no_grad(), tr.autocast():
            emb = embed_grouped(tr.teacher.backbone, {k: norm(v) for k, v in t_in.items()})
            tr.teacher.loc_head(emb["whole"])
            tr.teacher.loc_head(emb["parts"])

    def ema() -> None:
        update_teacher(tr.student.encoder, tr.teacher, 0.996)

    rounds = _round_times({"bare": bare, "full": full, "teacher_forward": teacher_forward, "ema": ema},
                          device, args.repeats, args.warmup)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    fwd_bwd, update = splits["fwd_bwd"][args.warmup:], splits["update"][args.warmup:]
    per_round = list(zip(rounds["bare"], rounds["full"], rounds["teacher_forward"], rounds["ema"],
                         fwd_bwd, update, strict=True))
    # Ratios and residuals round by round (paired), then the median: robust to slow load drift.
    parts = {
        "teacher_forward": med["teacher_forward"],
        "heads_losses_and_their_backward": statistics.median(f - b_ - t for b_, _, t, _, f, _ in per_round),
        "optimizer_clip_centre": statistics.median(u - e for _, _, _, e, _, u in per_round),
        "ema_update": med["ema"],
    }
    overhead = statistics.median(f / b_ - 1.0 for b_, f, *_ in per_round)
    n_student = {k: tuple(v.shape) for k, v in s_in.items()}
    return {
        "batch": b, "rounds": args.repeats, "student_inputs": n_student, "bare_s": med["bare"],
        "full_s": med["full"], "overhead": overhead,
        "overhead_of_minima": min(rounds["full"]) / min(rounds["bare"]) - 1.0,
        "overhead_without_optimizer": overhead - parts["optimizer_clip_centre"] / med["bare"],
        "overhead_without_teacher_forward": overhead - med["teacher_forward"] / med["bare"],
        "overhead_parts_s": parts,
        "overhead_parts_frac_of_bare": {k: v / med["bare"] for k, v in parts.items()},
    }


# --------------------------------------------------------------------------- (c): view generation
def _intensity_transforms(size: int, blur_prob: float, icfg: Any) -> list:
    """torchvision counterparts of ``augment_intensity``: window/level as brightness/contrast, gamma, blur."""
    import torchvision.transforms.v2 as T
    from torchvision.transforms.v2 import functional as TF

    scale = size / icfg.blur_reference_size
    lo, hi = icfg.blur_sigma[0] * scale, icfg.blur_sigma[1] * scale
    kernel = min(2 * math.ceil(3 * hi) + 1, size - 1 if size % 2 == 0 else size)
    g_lo, g_hi = icfg.gamma
    gamma = T.Lambda(lambda x: TF.adjust_gamma(x, math.exp(random.uniform(math.log(g_lo), math.log(g_hi)))))
    return [
        T.RandomApply([T.ColorJitter(brightness=icfg.level_shift * 2, contrast=(1 / icfg.width_scale[1],
                                                                                 1 / icfg.width_scale[0]))],
                      p=icfg.window_prob),
        T.RandomApply([gamma], p=icfg.gamma_prob),
        T.RandomApply([T.GaussianBlur(kernel, (max(lo, 1e-3), hi))], p=blur_prob),
    ]


class PerViewReference:
    """The same views as ``ViewGenerator`` (level 0, nested local crops, no CutMix), one torchvision
    ``Compose`` call per view, sample by sample."""

    def __init__(self, vcfg: Any) -> None:
        import torchvision.transforms.v2 as T

        bilinear = T.InterpolationMode.BILINEAR
        gs, ls, ic = vcfg.global_size, vcfg.local_size, vcfg.intensity
        self.k, self.n_local, self.gs = vcfg.k, vcfg.n_local, gs
        self.whole = T.Compose([T.Resize((gs, gs), antialias=False),
                                *_intensity_transforms(gs, ic.blur_prob_whole, ic)])
        self.globl = T.Compose([
            T.RandomResizedCrop(gs, scale=vcfg.global_scale, ratio=vcfg.global_aspect, antialias=False),
            T.RandomRotation(vcfg.rotation_degrees, interpolation=bilinear),
            *_intensity_transforms(gs, ic.blur_prob_global, ic)])
        self.local = T.Compose([
            T.RandomResizedCrop(ls, scale=vcfg.local_scale, antialias=False,
                                ratio=(vcfg.local_tall_aspect[0], vcfg.local_wide_aspect[1])),
            T.RandomRotation(vcfg.rotation_degrees, interpolation=bilinear),
            *_intensity_transforms(ls, ic.blur_prob_local, ic)])
        self.part = T.Compose(_intensity_transforms(gs, ic.blur_prob_whole, ic))

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF

        out: dict[str, list[torch.Tensor]] = {"whole": [], "global": [], "local": [], "parts": []}
        _, _, h, w = images.shape
        ph, pw = h // self.k, w // self.k
        for img in images:
            out["whole"].append(self.whole(img))
            out["global"].append(torch.stack([self.globl(img)]))
            out["local"].append(torch.stack([self.local(img) for _ in range(self.n_local)]))
            out["parts"].append(torch.stack([
                self.part(TF.resized_crop(img, r * ph, c * pw, ph, pw, [self.gs, self.gs], antialias=False))
                for r in range(self.k) for c in range(self.k)]))
        return {name: torch.stack(v) for name, v in out.items()}


def _views_case(batch: int, image: int, gs: int, ls: int, device: torch.device, repeats: int,
                warmup: int) -> dict[str, Any]:
    from holons.anatomy import CutMixConfig, IntensityConfig, ViewConfig, ViewGenerator

    common = dict(global_size=gs, local_size=ls, k=2, n_global=1, n_local=8, local_crops="nested",
                  intensity=IntensityConfig(blur_reference_size=gs))
    plain = ViewConfig(**common, cutmix=CutMixConfig(prob=0.0))
    mixed = ViewConfig(**copy.deepcopy(common), cutmix=CutMixConfig(prob=0.5, mode="box"))
    gen_plain, gen_mixed, ref = ViewGenerator(plain), ViewGenerator(mixed), PerViewReference(plain)
    images = torch.rand(batch, 1, image, image, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    random.seed(0)
    torch.manual_seed(0)
    ours, theirs = gen_plain(images, level=0, generator=g), ref(images)
    shapes = {"whole": ours.whole.shape, "global": ours.global_crops.shape,
              "local": ours.local_crops.shape, "parts": ours.parts.shape}
    for name, t in theirs.items():
        if t.shape != shapes[name]:
            raise RuntimeError(f"reference {name} views: {tuple(t.shape)}, holons: {tuple(shapes[name])}")
    med = _median_times({
        "holons": lambda: gen_plain(images, level=0, generator=g),
        "holons_cutmix": lambda: gen_mixed(images, level=0, generator=g),
        "torchvision_per_view": lambda: ref(images),
    }, device, repeats, warmup)
    n_views = batch * (1 + 1 + 8 + 4)
    return {"batch": batch, "image": image, "global": gs, "local": ls, "views_per_batch": n_views,
            **{f"{k}_s": v for k, v in med.items()},
            "speedup": med["torchvision_per_view"] / med["holons"],
            "speedup_with_cutmix": med["torchvision_per_view"] / med["holons_cutmix"]}


def bench_views(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    cases = {"cpu_tiny": (args.views_batch_tiny, 128, 64, 32),
             "paper": (args.views_batch_paper, 256, 224, 96)}
    return {name: _views_case(b, img, gs, ls, device, args.view_repeats, 1)
            for name, (b, img, gs, ls) in cases.items()}


# --------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_report(res: dict[str, Any]) -> None:
    print(f"device {res['device']}, torch threads {res['threads']}, {res['machine']}")
    if "breakdown" in res:
        a = res["breakdown"]
        print(f"\n(a) step-time breakdown, cpu_tiny via pretrain(), batch {a['batch']}, "
              f"{a['steps_run']} steps (medians, step 1 dropped)")
        print(f"    {'mode':<22}{'step':>9}{'data':>9}{'views':>9}{'fwd-bwd':>9}{'update':>9}")
        rows = [(m, b) for m, b in a["by_mode"].items()] + [("schedule-weighted", a["schedule_weighted"])]
        for mode, b in rows:
            print(f"    {mode:<22}{b['step_s']:8.3f}s" + "".join(
                f"{_pct(b[k + '_frac']):>9}" for k in ("data", "views", "fwd_bwd", "update")))
        print(f"    pretrain() wall {a['pretrain_wall_s']:.1f} s, of which {a['fixed_overhead_s']:.1f} s "
              "outside steps (set-up, checkpoints, export)")
    if "overhead" in res:
        o = res["overhead"]
        print("\n(b) full adamv2 part-whole step vs bare student backbone fwd+bwd, same views, "
              f"batch {o['batch']}")
        print(f"    median bare {o['bare_s'] * 1e3:.1f} ms, full {o['full_s'] * 1e3:.1f} ms; overhead "
              f"(median of {o['rounds']} paired rounds) {_pct(o['overhead'])}, "
              f"of the minima {_pct(o['overhead_of_minima'])}")
        print(f"    without the optimizer step {_pct(o['overhead_without_optimizer'])}, "
              f"without the teacher forward {_pct(o['overhead_without_teacher_forward'])}")
        for k, v in o["overhead_parts_s"].items():
            print(f"      {k:<34}{v * 1e3:8.1f} ms  {_pct(o['overhead_parts_frac_of_bare'][k])} of bare")
    if "views" in res:
        print("\n(c) batched view generation vs per-view torchvision pipeline "
              "(1 whole, 1 global, 8 local, 4 parts)")
        print(f"    {'case':<10}{'batch':>6}{'sizes':>14}{'holons':>11}{'+cutmix':>11}{'torchvision':>13}"
              f"{'speedup':>9}")
        for name, c in res["views"].items():
            sizes = f"{c['image']}->{c['global']}/{c['local']}"
            print(f"    {name:<10}{c['batch']:>6}{sizes:>14}{c['holons_s'] * 1e3:9.1f}ms"
                  f"{c['holons_cutmix_s'] * 1e3:9.1f}ms{c['torchvision_per_view_s'] * 1e3:11.1f}ms"
                  f"{c['speedup']:8.1f}x")
    if "breakdown" in res:
        m = res["breakdown"]["memory"]
        print("\n(d) peak memory of the cpu_tiny run")
        print(f"    max RSS {m['max_rss_mb']:.0f} MB (RSS before pretrain() {m['rss_before_mb']:.0f} MB: "
              f"+{m['max_rss_mb'] - m['rss_before_mb']:.0f} MB for training)")
        if "cuda_max_allocated_mb" in m:
            print(f"    CUDA max allocated {m['cuda_max_allocated_mb']:.0f} MB, "
                  f"reserved {m['cuda_max_reserved_mb']:.0f} MB")
    print("\nsummary (ratio vs the reference measured in this run)")
    print(f"    {'benchmark':<48}{'value':>10}{'target':>10}  verdict")
    t = res["targets"]
    for name, (value, target, ok) in t.items():
        print(f"    {name:<48}{value:>10}{target:>10}  {_verdict(ok)}")


def _targets(res: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    out = {}
    if "breakdown" in res:
        for mode, b in res["breakdown"]["by_mode"].items():
            f = b["views_frac"]
            out[f"(a) views share of step, {mode}"] = (_pct(f).strip(), "<= 10 %", f <= VIEWS_TARGET)
        f = res["breakdown"]["schedule_weighted"]["views_frac"]
        out["(a) views share of step, schedule-weighted"] = (_pct(f).strip(), "<= 10 %", f <= VIEWS_TARGET)
    if "overhead" in res:
        f = res["overhead"]["overhead"]
        out["(b) heads+losses+EMA overhead over backbone"] = (_pct(f).strip(), "<= 15 %",
                                                             f <= OVERHEAD_TARGET)
    for name, c in res.get("views", {}).items():
        out[f"(c) batched views speedup, {name}"] = (f"{c['speedup']:.1f}x", ">= 5x",
                                                     c["speedup"] >= SPEEDUP_TARGET)
    return out


# --------------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="pretraining YAML (default cpu_tiny)")
    p.add_argument("--n-images", type=int, default=96, help="phantom radiographs in the temporary cache")
    p.add_argument("--cache-size", type=int, default=128, help="cache side in pixels")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--steps-per-level", type=int, default=3, help="(a) trainer steps per (stage, level)")
    p.add_argument("--repeats", type=int, default=9, help="(b) timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="(b) untimed rounds first")
    p.add_argument("--view-repeats", type=int, default=5, help="(c) timed rounds")
    p.add_argument("--views-batch-tiny", type=int, default=32, help="(c) batch at 128 px -> 64/32")
    p.add_argument("--views-batch-paper", type=int, default=16, help="(c) batch at 256 px -> 224/96")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: 2 threads on a shared 2-core VM are erratic; 0 = torch's)")
    p.add_argument("--only", default="abcd",
                   help="which parts to run, e.g. 'c' or 'ab' (d comes with a; e and f only when named)")
    step_throughput.add_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="also write the result dict here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child is not None:
        out = run_trainer_child(json.loads(args.child))
        print(json.dumps(out))
        return out
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        args.threads = None
    args.device = str(_device(args.device).type)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    res: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="minutes"), "device": gpu or "cpu",
        "threads": torch.get_num_threads(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        work = Path(tmp)
        if set(args.only) & set("abdef"):
            t0 = time.perf_counter()
            cache = make_phantom_cache(work, args.n_images, args.cache_size)
            print(f"phantom cache: {args.n_images} images at {args.cache_size} px "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
            if set(args.only) & set("ad"):
                res["breakdown"] = bench_breakdown(args, cache, work)
                print("(a)/(d) done", flush=True)
            if "b" in args.only:
                res["overhead"] = bench_overhead(args, cache, work)
                print("(b) done", flush=True)
                step_throughput.write_json(args.json, res)
            if "e" in args.only:
                res["tflops"] = step_throughput.bench_bare_tflops(args, cache, work)
                print("(e) done", flush=True)
                step_throughput.write_json(args.json, res)
            if "f" in args.only:
                def record(knobs: dict[str, Any]) -> None:
                    step_throughput.write_json(args.json, {**res, "knobs": knobs})

                res["knobs"] = step_throughput.bench_knobs(args, cache, work, record)
        if "c" in args.only:
            res["views"] = bench_views(args)
            print("(c) done", flush=True)
    res["targets"] = _targets(res)
    print()
    print_report(res)
    step_throughput.print_tables(res)
    step_throughput.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
