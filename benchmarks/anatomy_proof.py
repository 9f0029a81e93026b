"""Proof that pretraining learns anatomy (issue 4, section 9): zero-shot landmark correspondence of
random init, ``method: dino`` and ``method: adamv2`` at the same step budget, side by side.

Pipeline (everything under ``--out``):

1. ``phantoms/``: synthetic PA chest radiographs with ground-truth landmarks
   (``generate_radiographs``; train / val / test split by patient).
2. ``manifest.parquet`` and ``cache/`` are built from ``phantoms/dicom/train/`` alone (the
   generator writes DICOMs by split), so no held-out patient is ever seen in pretraining (the
   cache is built with split fractions (1, 0, 0): every cached image is a training image).
3. ``runs/<method>_s<seed>/``: ``pretrain`` of ``--config-adamv2`` and ``--config-dino`` (default
   ``configs/pretrain/cpu_tiny*.yaml``) with the curriculum rewritten to ``steps_per_level`` so
   that both runs take exactly ``--steps`` optimizer steps (adamv2 keeps the curriculum's stage /
   level proportions; dino collapses it into one level-0 localizability stage of equal length).
4. ``eval/<model>_s<seed>_<size>px_st<stages>/``: ``evaluate_correspondence`` on the held-out
   split (``--eval-split``, default test) for the random init (the seeded initialization the runs
   start from), the dino teacher and the adamv2 teacher, for every ``--eval-sizes`` x
   ``--eval-stages`` setting; the first setting is the primary one.
5. ``results.json`` and ``results.md``: the side-by-side table (mean / median error in pixels of
   the phantom frame, PCK, part-whole cosine medians) and the paired comparison of per-pair
   errors (bootstrap 95 % interval of the difference, same image pairs for every model), with the
   no-matching reference ``identity`` (each target landmark predicted at the source landmark's own
   position; the phantoms share one frame) on the same pairs. ``--students`` adds the students'
   backbones (the EMA teacher lags the student in short runs).

Run (about 15 minutes on 2 busy CPU cores with the defaults, one torch thread)::

    .venv/bin/python benchmarks/anatomy_proof.py --out /tmp/anatomy_proof
    .venv/bin/python benchmarks/anatomy_proof.py --out /tmp/anatomy_proof --reuse --steps 300 \
        --set optim.lr=1.0e-3          # another budget: data and matching finished runs reused

Defaults: 240 phantoms of 256 px (80 patients, 3 acquisitions each; about 56 train patients), a
128 px cache, 240 steps of batch 32 per method, seed 0, evaluation at 128 px on 60 image pairs of
the test split with the last three pyramid stages (stages 3, the primary setting) and the last
stage alone (stages 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = REPO / "configs" / "pretrain"
METHODS = ("adamv2", "dino")
MODELS = ("identity", "random", "dino", "adamv2", "dino-student", "adamv2-student")
COMPARISONS = (("random", "adamv2"), ("random", "dino"), ("dino", "adamv2"),
               ("random", "adamv2-student"), ("dino-student", "adamv2-student"))
RADII = (5.0, 10.0, 20.0)
CLEAR_MARGIN = 0.10  # "clearly better": at least 10 % lower mean error AND a bootstrap interval above 0


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/anatomy_proof"), help="output folder")
    p.add_argument("--reuse", action="store_true",
                   help="reuse phantoms / cache built with the same settings and finished runs with the same "
                        "resolved config (otherwise an existing --out is refused)")
    g = p.add_argument_group("data")
    g.add_argument("--n-phantoms", type=int, default=240, help="phantom images (3 per patient)")
    g.add_argument("--phantom-size", type=int, default=256, help="phantom side in pixels (the error frame)")
    g.add_argument("--cache-size", type=int, default=128, help="side of the cached training images")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms and their splits")
    g = p.add_argument_group("pretraining")
    g.add_argument("--config-adamv2", type=Path, default=CONFIGS / "cpu_tiny.yaml")
    g.add_argument("--config-dino", type=Path, default=CONFIGS / "cpu_tiny_dino.yaml")
    g.add_argument("--steps", type=int, default=240, help="optimizer steps per method (the shared budget)")
    g.add_argument("--batch-size", type=int, default=32, help="global batch (data.batch_size)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="pretraining seeds (each also seeds the random-init baseline)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to BOTH methods (repeatable), e.g. optim.lr=1.0e-3 (YAML "
                        "values: write floats with a dot, 1e-3 would be a string)")
    g.add_argument("--set-adamv2", dest="overrides_adamv2", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the adamv2 run only")
    g.add_argument("--set-dino", dest="overrides_dino", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the dino run only")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-split", default="test", help="held-out phantom split (test or val; never train)")
    g.add_argument("--eval-sizes", type=int, nargs="+", default=[128], help="evaluation frame sides")
    g.add_argument("--eval-stages", type=int, nargs="+", default=[3, 1],
                   help="pyramid stages concatenated for the dense features (1: last stage only); the "
                        "first is the primary setting (multi-scale since 2026-11-27 03:50 UTC: at 128 px the "
                        "last stage alone is a 4 x 4 map)")
    g.add_argument("--pairs", type=int, default=60, help="ordered image pairs of different patients")
    g.add_argument("--eval-seed", type=int, default=0, help="seed of the pair sampling")
    g.add_argument("--students", action="store_true",
                   help="also evaluate the students' backbones (diagnostic: the EMA teacher lags in "
                        "short runs)")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the paired comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (OMP_NUM_THREADS is set too); 1 is fastest on a busy "
                        "2-core machine")
    p.add_argument("--device", default="auto", help="pretraining / evaluation device (auto, cpu, cuda)")
    p.add_argument("--jobs", type=int, default=1,
                   help="pretraining runs at a time, in separate processes (e.g. 6 on one GPU)")
    args = p.parse_args(argv)
    if args.eval_split == "train":
        p.error("--eval-split must be a held-out split (test or val), not train")
    if args.steps < 1 or args.n_phantoms < 12:
        p.error("--steps must be >= 1 and --n-phantoms >= 12")
    return args


def _log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------- data
def _settings_match(path: Path, settings: dict[str, Any]) -> bool:
    return path.is_file() and json.loads(path.read_text()) == settings


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Phantoms, then a cache of the train-split patients only; returns counts per split."""
    from holons.data.cache import build_cache
    from holons.data.index import index_archive
    from holons.data.synthetic.radiographs import generate_radiographs
    from holons.files import atomic_write

    root, phantoms = args.out, args.out / "phantoms"
    settings = {"n": args.n_phantoms, "size": args.phantom_size, "seed": args.data_seed,
                "cache_size": args.cache_size}
    stamp = root / "data_settings.json"
    table_path = phantoms / "image_table.csv"
    if args.reuse and _settings_match(stamp, settings) and (root / "cache" / "cache.json").is_file():
        _log("data: reusing phantoms and cache")
    else:
        for p in (phantoms, root / "cache", root / "manifest.parquet"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        t0 = time.perf_counter()
        generate_radiographs(phantoms, n=args.n_phantoms, seed=args.data_seed, size=args.phantom_size,
                             formats=("dicom", "png"), progress=False)
        _log(f"data: {args.n_phantoms} phantoms in {time.perf_counter() - t0:.0f} s")
        index_archive(phantoms / "dicom" / "train", root / "manifest.parquet", secret=b"anatomy-proof",
                      modalities=None, progress=False)
        build_cache(root / "manifest.parquet", root / "cache", size=args.cache_size, progress=False,
                    split_fractions=(1.0, 0.0, 0.0))
        with atomic_write(stamp, "w") as f:
            json.dump(settings, f)
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    cached = pd.read_parquet(root / "cache" / "index.parquet")
    train_ids = set(table.loc[table["split"] == "train", "id"])
    cached_ids = {Path(p).stem for p in cached["path"]}
    if not cached_ids <= train_ids:
        leaked = sorted(cached_ids - train_ids)[:3]
        raise RuntimeError(f"the pretraining cache holds non-train images: {leaked}")
    patients = table.groupby("split")["patient_id"].nunique().to_dict()
    images = table["split"].value_counts().to_dict()
    return {"phantoms": str(phantoms), "cache": str(root / "cache"), "cached_images": int(len(cached)),
            "images_per_split": images, "patients_per_split": patients, **settings}


# --------------------------------------------------------------------------- pretraining
def budget_config(path: Path, steps: int, batch_size: int, seed: int, cache: Path, device: str,
                  overrides: list[str]) -> dict[str, Any]:
    """The YAML config with ``overrides`` applied and its curriculum rewritten to about ``steps`` steps.

    Every stage keeps its share of the configured curriculum (``epochs_per_level`` or
    ``steps_per_level`` times its number of levels) and gets ``steps_per_level`` instead, rounded
    to whole steps (the realised total is ``curriculum_steps``; exactly ``steps`` whenever the
    shares divide it). ``method: dino`` runs collapse the curriculum into one stage of the same total.
    """
    from holons.config import _merge, parse_overrides

    cfg = yaml.safe_load(path.read_text())
    cfg = _merge(cfg, {"seed": seed, "device": device, "data": {"cache_dir": str(cache), "split": "train",
                                                                  "batch_size": batch_size}})
    return rewrite_curriculum(_merge(cfg, parse_overrides(overrides)), steps)


def rewrite_curriculum(cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    """Give every curriculum stage its configured share of ``steps`` as whole ``steps_per_level``."""
    stages = cfg.get("curriculum", {}).get("stages") or [{"mode": "localizability", "levels": [0]}]
    per_level = [float(st.get("epochs_per_level") or st.get("steps_per_level") or 1.0) for st in stages]
    total = sum(w * len(st.get("levels", [0, 1, 2])) for w, st in zip(per_level, stages, strict=True))
    cfg.setdefault("curriculum", {})["stages"] = [
        {"mode": st.get("mode", "part_whole"), "levels": list(st.get("levels", [0, 1, 2])),
         "steps_per_level": max(1, round(steps * w / total))}
        for w, st in zip(per_level, stages, strict=True)]
    cfg["max_steps"] = None
    return cfg


def curriculum_steps(cfg: dict[str, Any]) -> int:
    return sum(st["steps_per_level"] * len(st["levels"]) for st in cfg["curriculum"]["stages"])


def comparable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without bookkeeping keys: equal means a finished run can be reused."""
    from holons.config import load_config, to_dict
    from holons.ssl.config import PretrainConfig

    d = to_dict(load_config(PretrainConfig, None, cfg))
    for key in ("resume", "overwrite", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        d.pop(key, None)
    return d


def pretrain_or_resume(cfg: dict[str, Any], run_dir: Path, reuse: bool) -> Any:
    """``pretrain`` ``cfg`` into ``run_dir``. With ``reuse``, an interrupted run of the same config
    (stopped, killed) continues from its last checkpoint; otherwise the run dir starts over."""
    from holons.ssl.checkpoint import latest_checkpoint
    from holons.ssl.trainer import pretrain

    previous = run_dir / "config.yaml"
    resume = (reuse and previous.is_file() and latest_checkpoint(run_dir / "checkpoints") is not None
              and comparable_config(yaml.safe_load(previous.read_text())) == comparable_config(cfg))
    if resume:
        _log(f"pretrain: {run_dir.name} continues from its last checkpoint")
    return pretrain(cfg, run_dir, ["resume=true" if resume else "overwrite=true"], progress=False)


def run_pretraining(cfg: dict[str, Any], run_dir: Path, reuse: bool) -> dict[str, Any]:
    """Pretrain (or reuse a finished run with the same config); returns its export folder and summary."""
    exported = run_dir / "exported"
    if reuse and exported.is_dir() and (run_dir / "config.yaml").is_file():
        previous = yaml.safe_load((run_dir / "config.yaml").read_text())
        if comparable_config(previous) == comparable_config(cfg):
            _log(f"pretrain: reusing {run_dir.name}")
            return {"run_dir": str(run_dir), "exported": str(exported), "reused": True,
                    **run_summary(run_dir)}
    t0 = time.perf_counter()
    result = pretrain_or_resume(cfg, run_dir, reuse)
    wall = time.perf_counter() - t0
    if result.status != "finished" or not exported.is_dir():
        raise RuntimeError(f"pretraining {run_dir.name} ended {result.status} at step {result.step}")
    _log(f"pretrain: {run_dir.name} finished {result.step} steps in {wall:.0f} s")
    return {"run_dir": str(run_dir), "exported": str(exported), "reused": False, "wall_s": round(wall, 1),
            **run_summary(run_dir)}


def run_all_pretraining(jobs: list[tuple[str, int, dict[str, Any]]], out: Path,
                        args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (method, seed) run, one after another or ``--jobs`` at a time (``run_parallel``). Same
    results either way: each run is seeded by its config alone."""
    calls = [(cfg, out / "runs" / f"{method}_s{seed}", args.reuse) for method, seed, cfg in jobs]
    return run_parallel(run_pretraining, calls, args.jobs, args.threads)


def run_parallel(fn: Any, calls: list[tuple], jobs: int, threads: int) -> list[Any]:
    """``[fn(*call) for call in calls]``, in this process when ``jobs <= 1``, else ``jobs`` at a time in
    spawned processes of ``threads`` torch threads each (small models leave a GPU mostly idle, so
    parallel runs share it well). ``fn`` must be importable by name in a spawned process."""
    if jobs <= 1 or len(calls) <= 1:
        return [fn(*call) for call in calls]
    import multiprocessing as mp
    import signal

    def _stop(signum: int, frame: Any) -> None:  # SIGTERM (e.g. `timeout`): leave no orphaned runs
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _stop)
    try:  # Pool.__exit__ terminates the workers, also when an exception or SystemExit leaves the block
        with mp.get_context("spawn").Pool(jobs, initializer=torch.set_num_threads,
                                          initargs=(threads,)) as pool:
            pending = [pool.apply_async(fn, call) for call in calls]
            return [r.get() for r in pending]
    finally:
        signal.signal(signal.SIGTERM, previous)


def export_student(run_dir: Path, folder: Path) -> str:
    """The student backbone of a finished run, exported to ``folder`` (outside the run dir, which
    holds only what a holons run writes)."""
    from holons.ssl.export import export

    export(run_dir, folder, which="student")
    return str(folder)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Steps, first / last loss, the last value of each loss term and the last teacher entropy, from
    ``metrics.jsonl`` (empty when the run has logged no step)."""
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    recs = [r for r in recs if "step" in r]
    if not recs:
        return {}
    first, last = recs[0], recs[-1]
    summary = {"steps": last["step"], "loss_first": first.get("loss"), "loss_last": last.get("loss"),
               "teacher_entropy_last": last.get("teacher_entropy"), "img_per_s_last": last.get("img_per_s")}
    for term in ("loss_loc", "loss_comp", "loss_dec"):
        if last.get(term) is not None:
            summary[f"{term}_last"] = last[term]
    return summary


# --------------------------------------------------------------------------- evaluation
def evaluate_model(weights: str, arch: str, seed: int, data, eval_dir: Path, args: argparse.Namespace,
                   size: int, stages: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Correspondence summary and per-pair mean errors of one backbone at one evaluation setting."""
    from holons.eval.correspondence import evaluate_correspondence
    from holons.eval.features import describe_weights, load_backbone
    from holons.eval.results import write_results

    torch.manual_seed(seed)  # the random init is the one a pretraining run of this seed starts from
    backbone = load_backbone(weights, arch)
    result = evaluate_correspondence(backbone, data, size=size, pairs=args.pairs, seed=args.eval_seed,
                                     split=args.eval_split, radii=RADII, part_whole=True, random_wholes=2,
                                     stages=stages, device=args.device, progress=False)
    summary = {**describe_weights(weights, backbone), **result.summary}
    write_results(eval_dir, summary, {"points": result.points, "part_whole": result.part_whole})
    pair = result.points.groupby(["source", "target"])["error_px"].mean()
    return summary, pair


def identity_reference(data, points: pd.DataFrame) -> tuple[dict[str, Any], pd.Series]:
    """The no-matching reference: predict each target landmark at the source landmark's own position
    (both phantoms share the frame). Same pairs as ``points``; a feature matcher worth the name beats it."""
    from holons.data.annotated import STRUCTURES
    from holons.finetune.metrics import error_summary

    errors, pair_means = [], {}
    for src, tgt in points[["source", "target"]].drop_duplicates().itertuples(index=False):
        a, b = data.landmarks(src), data.landmarks(tgt)
        e = np.concatenate([np.linalg.norm(a[s] - b[s], axis=1) for s in STRUCTURES])
        errors.append(e)
        pair_means[(src, tgt)] = float(e.mean())
    e = np.concatenate(errors)
    pair = pd.Series(pair_means)
    summary = {"overall": error_summary(e, RADII), "per_structure": {},
               "pair_mean_px": {"mean": float(pair.mean())}}
    return summary, pair


def paired_difference(base: pd.Series, other: pd.Series, n_boot: int, seed: int) -> dict[str, float]:
    """Mean of (base - other) per-pair errors (positive: ``other`` is better) and its bootstrap 95 % CI."""
    joined = pd.concat([base.rename("a"), other.rename("b")], axis=1, join="inner")
    d = (joined["a"] - joined["b"]).to_numpy()
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1) if n_boot > 0 else d[None]
    return {"mean_diff_px": float(d.mean()), "ci95_low": float(np.percentile(boots, 2.5)),
            "ci95_high": float(np.percentile(boots, 97.5)), "other_wins_fraction": float((d > 0).mean()),
            "pairs": int(len(d))}


def _mean_over_seeds(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
        if len(vals) > 1:
            out[f"{k}_std"] = float(np.std(vals, ddof=1))
    return out


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    o = summary["overall"]
    pw = summary.get("part_whole", {})
    row = {"mean_px": o["mean_px"], "median_px": o["median_px"],
           "pair_mean_px": summary["pair_mean_px"]["mean"]}
    row.update({k: v for k, v in o.items() if k.startswith("pck@")})
    row["pw_image_median"] = pw.get("image", {}).get("median")
    row["pw_random_median"] = pw.get("random", {}).get("median")
    row["per_structure_mean_px"] = {s: m["mean_px"] for s, m in summary["per_structure"].items()}
    if not row["per_structure_mean_px"]:
        del row["per_structure_mean_px"]
    return row


# --------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    """The side-by-side tables (one per evaluation setting) and the verdict, as Markdown."""
    radii = [int(r) for r in results["eval"]["radii_px"]]
    lines = [f"# Anatomy proof: zero-shot landmark correspondence ({results['date']})", "",
             f"Held-out split `{results['eval']['split']}` of {results['data']['n']} phantoms "
             f"({results['data']['size']} px; errors in pixels of that frame), "
             f"{results['eval']['pairs']} image pairs of different patients; "
             f"{results['budget']['steps']} steps of batch {results['budget']['batch_size']} per method; "
             f"pretraining seeds {results['budget']['seeds']}. `identity` is the no-matching reference "
             "(each target landmark predicted at the source landmark's own position); `*-student` rows "
             "are the students' backbones (the other rows of trained models are the EMA teachers).", ""]
    for name, setting in results["settings"].items():
        tag = " (primary)" if name == results["primary"] else ""
        lines += [f"## {name}{tag}", "",
                  "| model | mean px | median px | " + " | ".join(f"PCK@{r} %" for r in radii)
                  + " | part-whole cos median (image / random wholes) |",
                  "|---" * (4 + len(radii)) + "|"]
        for model in MODELS:
            r = setting["models"].get(model)
            if r is None:
                continue
            pw_img = "-" if r["pw_image_median"] is None else f"{r['pw_image_median']:.3f}"
            pw_rnd = "-" if r["pw_random_median"] is None else f"{r['pw_random_median']:.3f}"
            std = f" ± {r['mean_px_std']:.2f}" if "mean_px_std" in r else ""
            lines.append(f"| {model} | {r['mean_px']:.2f}{std} | {r['median_px']:.2f} | "
                         + " | ".join(f"{r[f'pck@{x}']:.1f}" for x in radii) + f" | {pw_img} / {pw_rnd} |")
        lines.append("")
        for key, cmp in setting["paired"].items():
            lines.append(f"- {key}: mean per-pair error difference {cmp['mean_diff_px']:+.2f} px "
                         f"(95 % CI {cmp['ci95_low']:+.2f} .. {cmp['ci95_high']:+.2f}; positive = the second "
                         f"model is better), second model better on "
                         f"{cmp['other_wins_fraction']:.0%} of pairs")
        lines.append("")
    v = results["verdict"]
    lines += ["## Verdict (primary setting)", "",
              f"- adamv2 clearly beats random init (>= {CLEAR_MARGIN:.0%} lower mean error and CI above 0): "
              f"**{v.get('adamv2_beats_random')}**",
              "- adamv2 at least as good as dino (mean error <= dino's): "
              f"**{v.get('adamv2_matches_dino')}**", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    from holons.data.annotated import load_annotated
    from holons.files import atomic_write

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.reuse:
        raise SystemExit(f"{out} is not empty; pass --reuse to continue in it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_info = prepare_data(args)
    _log(f"data: {data_info['cached_images']} train images cached; patients per split "
         f"{data_info['patients_per_split']}")

    configs = {"adamv2": args.config_adamv2, "dino": args.config_dino}
    extra = {"adamv2": args.overrides_adamv2, "dino": args.overrides_dino}
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    arch = None
    budgets: dict[int, int] = {}
    jobs: list[tuple[str, int, dict[str, Any]]] = []
    for seed in args.seeds:
        for method in args.methods:
            cfg = budget_config(configs[method], args.steps, args.batch_size, seed, out / "cache",
                                args.device, [*args.overrides, *extra[method]])
            if cfg.get("method") != method:
                raise SystemExit(f"{configs[method]} has method {cfg.get('method')!r}, expected {method!r}")
            budget = curriculum_steps(cfg)
            if budgets.setdefault(seed, budget) != budget:
                raise SystemExit(f"the curricula give different budgets ({budgets[seed]} vs {budget} steps); "
                                 "both configs need the same curriculum shares")
            model_arch = cfg["model"]["backbone"]
            if arch is not None and model_arch != arch:
                raise SystemExit(f"both methods must use one backbone, got {arch} and {model_arch}")
            arch = model_arch
            _log(f"pretrain: {method} seed {seed}, {budget} steps, curriculum "
                 f"{[(s['mode'], s['levels'], s['steps_per_level']) for s in cfg['curriculum']['stages']]}")
            jobs.append((method, seed, cfg))
    for (method, seed, cfg), done in zip(jobs, run_all_pretraining(jobs, out, args), strict=True):
        runs[method][seed] = {"config": str(configs[method]), "curriculum": cfg["curriculum"]["stages"],
                              **done}
        if args.students:
            runs[method][seed]["exported_student"] = export_student(
                out / "runs" / f"{method}_s{seed}", out / "students" / f"{method}_s{seed}")

    data = load_annotated(out / "phantoms")
    settings: dict[str, Any] = {}
    for size in args.eval_sizes:
        for stages in args.eval_stages:
            name = f"{size}px_stages{stages}"
            per_model: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
            pairs: dict[str, list[pd.Series]] = {m: [] for m in MODELS}
            for seed in args.seeds:
                weights = {"random": "random", **{m: runs[m][seed]["exported"] for m in args.methods}}
                if args.students:
                    weights.update({f"{m}-student": runs[m][seed]["exported_student"] for m in args.methods})
                for model, w in weights.items():
                    t0 = time.perf_counter()
                    folder = out / "eval" / f"{model}_s{seed}_{name}"
                    summary, pair = evaluate_model(w, arch, seed, data, folder, args, size, stages)
                    per_model[model].append(_row(summary))
                    pair.index = pd.MultiIndex.from_tuples([(seed, *k) for k in pair.index])
                    pairs[model].append(pair)
                    if model == "random":  # the no-matching reference on the same pairs
                        ref, ref_pair = identity_reference(data, pd.read_csv(folder / "points.csv"))
                        per_model["identity"].append(_row(ref))
                        ref_pair.index = pd.MultiIndex.from_tuples([(seed, *k) for k in ref_pair.index])
                        pairs["identity"].append(ref_pair)
                    _log(f"eval {name}: {model} seed {seed}: mean {summary['overall']['mean_px']:.2f} px, "
                         f"median {summary['overall']['median_px']:.2f} px "
                         f"({time.perf_counter() - t0:.0f} s)")
            keys = ["mean_px", "median_px", "pair_mean_px", *[f"pck@{r:g}" for r in RADII],
                    "pw_image_median", "pw_random_median"]
            models = {m: {**_mean_over_seeds(rows, keys), "per_seed": rows}
                      for m, rows in per_model.items() if rows}
            joined = {m: pd.concat(p) for m, p in pairs.items() if p}
            paired = {}
            for a, b in COMPARISONS:
                if a in joined and b in joined:
                    paired[f"{a} -> {b}"] = paired_difference(joined[a], joined[b], args.bootstrap,
                                                              args.eval_seed)
            settings[name] = {"size": size, "stages": stages, "models": models, "paired": paired}

    primary = f"{args.eval_sizes[0]}px_stages{args.eval_stages[0]}"
    p = settings[primary]
    verdict: dict[str, Any] = {}
    if "adamv2" in p["models"]:
        rnd, ada = p["models"]["random"]["mean_px"], p["models"]["adamv2"]["mean_px"]
        cmp = p["paired"]["random -> adamv2"]
        verdict["adamv2_beats_random"] = bool(ada <= (1 - CLEAR_MARGIN) * rnd and cmp["ci95_low"] > 0)
        if "dino" in p["models"]:
            verdict["adamv2_matches_dino"] = bool(ada <= p["models"]["dino"]["mean_px"])
    results = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                    "device": args.device},
        "command": "benchmarks/anatomy_proof.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": data_info,
        "budget": {"steps": budgets.get(args.seeds[0], args.steps), "batch_size": args.batch_size,
                   "seeds": args.seeds,
                   "overrides": args.overrides, "overrides_adamv2": args.overrides_adamv2,
                   "overrides_dino": args.overrides_dino},
        "runs": {m: {str(s): r for s, r in v.items()} for m, v in runs.items()},
        "eval": {"split": args.eval_split, "pairs": args.pairs, "eval_seed": args.eval_seed,
                 "radii_px": list(RADII), "sizes": args.eval_sizes, "stages": args.eval_stages},
        "primary": primary, "settings": settings, "verdict": verdict,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    from holons.eval.results import json_safe

    with atomic_write(out / "results.json", "w") as f:
        json.dump(json_safe(results), f, indent=2)
        f.write("\n")
    text = markdown(results)
    with atomic_write(out / "results.md", "w") as f:
        f.write(text)
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
