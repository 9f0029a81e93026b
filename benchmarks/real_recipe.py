"""Real radiographs on CPU (issue 6, section 6): pretrain on the real chest radiographs of the shared
data as unlabeled images, then compare random init, ``method: dino`` and ``method: adamv2`` on JSRT
landmark correspondence and few-shot segmentation, several evaluation seeds, side by side.

Pipeline (everything under ``--out``, which must lie outside the repository; no data is copied into
the repository):

1. ``pretrain_images/<source>/...``: hard links (copies under ``--out`` where a link fails) of the
   unlabeled pretraining images: JSRT **train split only** (``hybridgnet_split == train``; its val
   images are the evaluation set and are never pretrained on), covid_chestxray frontal X-rays
   (view not ``L``), figure1_covid, actualmed_covid, and the txv_samples images and DICOMs.
   ``holons index`` does not follow symbolic links, hence hard links. Only counts per source are
   reported (file names can hold raw identifiers such as DICOM UIDs).
2. ``site_secret.txt`` (generated, mode 600), ``manifest.parquet`` (``index_archive``, every
   modality kept) and ``cache/`` (``build_cache``, ``--cache-size`` px, split fractions (1, 0, 0):
   every cached image is a training image). The script checks that no JSRT val image is cached.
3. ``runs/<method>_s<seed>/``: ``pretrain`` of ``--config-adamv2`` / ``--config-dino`` (default
   ``configs/pretrain/cpu_real*.yaml``) with the curriculum rewritten to ``steps_per_level`` so both
   methods take exactly ``--steps`` optimizer steps (adamv2 keeps its curriculum's stage shares;
   dino collapses it into one level-0 localizability stage of equal length); then
   ``weights/<method>_s<seed>/``: ``export`` of the EMA teacher.
4. ``report/``: ``holons.eval.report.compare`` on ``jsrt_scr`` for random / dino / adamv2 with the
   evaluation ``--seeds``: correspondence on pairs of val images with errors in the 1024 px frame,
   few-shot segmentation with support images from the train split and evaluation on the val split.
   With several ``--pretrain-seeds`` each pretraining seed gets its own comparison
   (``report/pretrain_s<seed>/``).
5. ``results.json`` / ``results.md``: timings, data counts, the headline table(s).

Budget: 2000 optimizer steps of batch 32 per method (~170 epochs of the 372 images). At 1000 steps adamv2
and dino were level on few-shot Dice; at 2000 adamv2 beats dino on both metrics by more than the spread over
3 pretraining seeds (docs/notes/lab_notebook.md, "Pretraining budget"). Measured on the shared 2-core VM:
index + 128 px cache ~10 s; with the default ``--jobs 2 --threads 1`` a seed's two runs pretrain side by
side (adamv2 ~0.96 s per step, dino ~0.44 s: ~32 minutes for the pair); the JSRT evaluation then runs with
2 threads, ~25 s (correspondence) + ~100 s (few-shot, 240 decoder steps) per model and evaluation seed
(3 models x 3 seeds: ~19 minutes). One pretraining seed took 46 minutes in all (a busy machine);
``--fast`` is a smoke test of about a minute::

    .venv/bin/python benchmarks/real_recipe.py --out /tmp/real_recipe
    .venv/bin/python benchmarks/real_recipe.py --out /tmp/real_recipe_fast --fast
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import secrets
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
for _p in (REPO, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from anatomy_proof import (  # noqa: E402
    comparable_config,
    curriculum_steps,
    pretrain_or_resume,
    rewrite_curriculum,
    run_parallel,
    run_summary,
)

CONFIGS = REPO / "configs" / "pretrain"
METHODS = ("adamv2", "dino")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
JSRT = "jsrt_scr"
# Evaluation on JSRT sized for about 15 minutes on 2 busy cores (3 models x 3 seeds): dense matching on
# the last two stages at 256 px (errors mapped back to the 1024 px frame), few-shot Dice with 6 and 12
# support images and a frozen encoder.
EVAL_SETTINGS: dict[str, dict[str, Any]] = {
    "correspondence": {"size": 256, "pairs": 30, "radii": (10.0, 20.0, 40.0), "random_wholes": 1,
                       "stages": 2, "split": "val"},
    # 240 decoder steps (fewshot_seg.DEFAULT_STEPS): with the 60 used until 2026-11-27 16:00 the decoder
    # could not fit its support set, and random init trailed the pretrained models mostly by how fast
    # their decoders converged (docs/notes/lab_notebook.md, "Few-shot decoder steps").
    "fewshot-seg": {"shots": (6, 12), "modes": ("frozen",), "size": 128, "steps": 240, "batch_size": 8,
                    "support_split": "train", "eval_split": "val"},
}
FAST_EVAL_SETTINGS: dict[str, dict[str, Any]] = {
    "correspondence": {"size": 64, "pairs": 3, "radii": (10.0, 20.0, 40.0), "random_wholes": 0,
                       "stages": 1, "split": "val"},
    "fewshot-seg": {"shots": (2,), "modes": ("frozen",), "size": 32, "steps": 3, "batch_size": 4,
                    "max_eval": 3, "support_split": "train", "eval_split": "val"},
}


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/real_recipe"),
                   help="output folder (outside the repository)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="the shared data folder (default: holons.files.shared_data_root())")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the data, cache and finished runs of an earlier call with the same settings "
                        "(otherwise a non-empty --out is refused)")
    p.add_argument("--fast", action="store_true",
                   help="smoke test: 64 px cache, a few steps, one seed, tiny evaluation settings")
    g = p.add_argument_group("pretraining")
    g.add_argument("--config-adamv2", type=Path, default=CONFIGS / "cpu_real.yaml")
    g.add_argument("--config-dino", type=Path, default=CONFIGS / "cpu_real_dino.yaml")
    g.add_argument("--cache-size", type=int, default=None, help="cached image side (default 128; fast 64)")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per method, the shared budget (default 2000; fast 4)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    g.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0],
                   help="pretraining seeds (each one pretrains both methods and gets its own comparison)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to BOTH methods (repeatable; YAML values)")
    g.add_argument("--set-adamv2", dest="overrides_adamv2", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for adamv2 alone, after --set (repeatable): a probe of one of its "
                        "settings against the same dino runs")
    g = p.add_argument_group("evaluation")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="evaluation seeds (pairs, few-shot support and decoder, random init; default 0 1 2, "
                        "fast 0)")
    g.add_argument("--pairs", type=int, default=None, help="correspondence pairs per seed (val images)")
    g.add_argument("--shots", type=int, nargs="+", default=None, help="few-shot support sizes")
    g.add_argument("--fewshot-steps", type=int, default=None, help="decoder training steps per few-shot run")
    g.add_argument("--modes", nargs="+", choices=["frozen", "finetune"], default=None,
                   help="few-shot encoder modes (default: frozen)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (OMP_NUM_THREADS too) per pretraining process; the evaluation "
                        "uses --jobs x --threads")
    p.add_argument("--jobs", type=int, default=2,
                   help="pretraining runs side by side, each in its own process (2 on a 2-core machine with "
                        "--threads 1: a seed's adamv2 and dino runs at once)")
    p.add_argument("--device", default="auto", help="pretraining device (auto, cpu, cuda)")
    p.add_argument("--eval-device", default=None,
                   help="evaluation device (default: --device); e.g. --device cuda --eval-device cpu "
                        "evaluates here the runs benchmarks/device_real.py pretrained on a GPU machine")
    args = p.parse_args(argv)
    args.cache_size = args.cache_size or (64 if args.fast else 128)
    args.steps = args.steps or (4 if args.fast else 2000)
    args.seeds = args.seeds or ([0] if args.fast else [0, 1, 2])
    if args.steps < 1 or args.cache_size < 32:
        p.error("--steps must be >= 1 and --cache-size >= 32")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    out = args.out.expanduser().resolve()
    if out == REPO or REPO in out.parents:
        p.error(f"--out must lie outside the repository ({REPO}): the recipe links or copies real data there")
    args.out = out
    return args


def _log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------- data
def pretraining_sources(radiographs: Path) -> list[tuple[str, Path, str]]:
    """(source, absolute file, relative destination) of every unlabeled pretraining image.

    JSRT contributes its train split only; covid_chestxray its frontal X-rays (metadata ``view`` not
    lateral); the other folders every image file under ``images/`` (txv_samples: every image and DICOM).
    """
    files: list[tuple[str, Path, str]] = []
    jsrt = radiographs / JSRT
    table = pd.read_csv(jsrt / "image_table.csv", dtype=str, keep_default_na=False)
    for image_id in table.loc[table["hybridgnet_split"] == "train", "image"]:
        files.append(("jsrt_train", jsrt / "images_1024" / f"{image_id}.png", f"jsrt_train/{image_id}.png"))

    covid = radiographs / "covid_chestxray"
    meta = pd.read_csv(covid / "metadata.csv", dtype=str, keep_default_na=False)
    frontal = meta[(meta["view"].str.upper() != "L") & (meta["modality"].str.lower() == "x-ray")]
    for name in sorted(set(frontal["filename"])):
        if (covid / "images" / name).is_file():
            files.append(("covid_chestxray", covid / "images" / name, f"covid_chestxray/{name}"))

    for source in ("figure1_covid", "actualmed_covid", "txv_samples"):
        root = radiographs / source
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((source, f, f"{source}/{f.relative_to(root).as_posix()}"))
    return files


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (copy when the link fails, e.g. across filesystems); returns which."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _settings_match(path: Path, settings: dict[str, Any]) -> bool:
    return path.is_file() and json.loads(path.read_text()) == settings


def prepare_data(args: argparse.Namespace, radiographs: Path) -> dict[str, Any]:
    """Linked pretraining images, site secret, manifest and cache; returns counts and timings."""
    from holons.data.cache import build_cache
    from holons.data.index import index_archive
    from holons.files import atomic_write

    root = args.out
    images, manifest, cache = root / "pretrain_images", root / "manifest.parquet", root / "cache"
    files = pretraining_sources(radiographs)
    listing = "\n".join(sorted(rel for _, _, rel in files)).encode("utf-8", errors="surrogateescape")
    settings = {"radiographs": str(radiographs), "cache_size": args.cache_size, "n_files": len(files),
                "files_sha256": hashlib.sha256(listing).hexdigest()}
    stamp = root / "data_settings.json"
    timings: dict[str, float] = {}
    if args.reuse and _settings_match(stamp, settings) and (cache / "cache.json").is_file():
        _log("data: reusing the linked images, manifest and cache")
    else:
        for p in (images, cache, manifest, manifest.with_name(manifest.name + ".parts")):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        t0 = time.perf_counter()
        how = [link_or_copy(src, images / rel) for _, src, rel in files]
        timings["link_s"] = round(time.perf_counter() - t0, 1)
        _log(f"data: {len(files)} images linked ({how.count('link')} hard links, {how.count('copy')} copies)")

        secret_file = root / "site_secret.txt"
        if not secret_file.exists():
            with atomic_write(secret_file, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            secret_file.chmod(0o600)
        secret = secret_file.read_bytes().strip()

        t0 = time.perf_counter()
        index_summary = index_archive(images, manifest, secret=secret, modalities=None, progress=False)
        timings["index_s"] = round(time.perf_counter() - t0, 1)
        _log(f"data: indexed in {timings['index_s']:.0f} s: "
             f"{ {k: v for k, v in index_summary.items() if isinstance(v, int | float)} }")
        t0 = time.perf_counter()
        build_cache(manifest, cache, size=args.cache_size, progress=False, split_fractions=(1.0, 0.0, 0.0))
        timings["cache_s"] = round(time.perf_counter() - t0, 1)
        with atomic_write(stamp, "w") as f:
            json.dump(settings, f)
        with atomic_write(root / "data_timings.json", "w") as f:
            json.dump(timings, f)
    if not timings and (root / "data_timings.json").is_file():
        timings = json.loads((root / "data_timings.json").read_text())

    cached = pd.read_parquet(cache / "index.parquet")
    skipped = pd.read_parquet(cache / "skipped.parquet") if (cache / "skipped.parquet").is_file() else None
    check_no_eval_leak(cached, radiographs)
    per_source = cached["path"].map(lambda p: Path(p).parts[0]).value_counts().sort_index().to_dict()
    return {"linked_images": len(files), "cached_images": int(len(cached)),
            "skipped_images": 0 if skipped is None else int(len(skipped)),
            "cached_per_source": {k: int(v) for k, v in per_source.items()},
            "cache_size": args.cache_size, "cache": str(cache), "timings": timings}


def check_no_eval_leak(cached: pd.DataFrame, radiographs: Path) -> None:
    """Refuse to go on when any JSRT image outside its train split is in the pretraining cache."""
    table = pd.read_csv(radiographs / JSRT / "image_table.csv", dtype=str, keep_default_na=False)
    held_out = set(table.loc[table["hybridgnet_split"] != "train", "image"])
    jsrt_cached = {Path(p).stem for p in cached["path"] if Path(p).parts[0] == "jsrt_train"}
    leaked = sorted(jsrt_cached & held_out)
    if leaked:
        raise SystemExit(f"the pretraining cache holds {len(leaked)} JSRT evaluation images, "
                         f"e.g. {leaked[:3]}")
    if not held_out:
        raise SystemExit("the JSRT table has no held-out (val) images to evaluate on")


# --------------------------------------------------------------------------- pretraining
def budget_config(path: Path, args: argparse.Namespace, seed: int, cache: Path,
                  extra: list[str] | None = None) -> dict[str, Any]:
    """The YAML config with the run's settings, the ``--set`` overrides and then ``extra`` applied, its
    curriculum rewritten to ``--steps`` steps: every stage keeps its share (``epochs_per_level`` or
    ``steps_per_level`` times its number of levels) as whole ``steps_per_level``."""
    from holons.config import _merge, parse_overrides

    cfg = yaml.safe_load(path.read_text())
    run = {"seed": seed, "device": args.device, "data": {"cache_dir": str(cache), "split": "train"}}
    if args.batch_size:
        run["data"]["batch_size"] = args.batch_size
    cfg = _merge(_merge(cfg, run), parse_overrides(args.overrides))
    return rewrite_curriculum(_merge(cfg, parse_overrides(extra or [])), args.steps)


def config_path(args: argparse.Namespace, method: str) -> Path:
    """The YAML config ``--config-adamv2`` / ``--config-dino`` names for ``method``."""
    return {"adamv2": args.config_adamv2, "dino": args.config_dino}[method]


def run_configs(args: argparse.Namespace, cache: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """{(method, pretraining seed): config} of every pretraining run, in run order (seed by seed, adamv2
    then dino), checked to share one backbone, batch size and step budget."""
    configs: dict[tuple[str, int], dict[str, Any]] = {}
    for seed in args.pretrain_seeds:
        for method in METHODS:
            path = config_path(args, method)
            extra = args.overrides_adamv2 if method == "adamv2" else None
            cfg = budget_config(path, args, seed, cache, extra)
            if cfg.get("method") != method:
                raise SystemExit(f"{path} has method {cfg.get('method')!r}, expected {method!r}")
            configs[(method, seed)] = cfg
    first = next(iter(configs.values()))
    for cfg in configs.values():
        if curriculum_steps(cfg) != curriculum_steps(first):
            raise SystemExit(f"the curricula give different budgets ({curriculum_steps(first)} vs "
                             f"{curriculum_steps(cfg)} steps)")
        if cfg["model"]["backbone"] != first["model"]["backbone"]:
            raise SystemExit(f"both methods must use one backbone, got {first['model']['backbone']} and "
                             f"{cfg['model']['backbone']}")
        if cfg["data"]["batch_size"] != first["data"]["batch_size"]:
            raise SystemExit("both methods must use one batch size")
    return configs


def pretrain_and_export(cfg: dict[str, Any], run_dir: Path, weights_dir: Path, reuse: bool) -> dict[str, Any]:
    """Pretrain (or reuse a finished run with the same config; with ``reuse`` an interrupted one continues
    from its last checkpoint), then export its teacher to ``weights_dir``."""
    from holons.ssl.export import export

    info: dict[str, Any] = {"run_dir": str(run_dir), "weights": str(weights_dir)}
    previous = run_dir / "config.yaml"
    if (reuse and weights_dir.is_dir() and previous.is_file()
            and comparable_config(yaml.safe_load(previous.read_text())) == comparable_config(cfg)):
        _log(f"pretrain: reusing {run_dir.name}")
        return {**info, "reused": True, **run_summary(run_dir)}
    t0 = time.perf_counter()
    result = pretrain_or_resume(cfg, run_dir, reuse)
    wall = time.perf_counter() - t0
    if result.status != "finished":
        raise SystemExit(f"pretraining {run_dir.name} ended {result.status} at step {result.step}")
    if weights_dir.exists():
        shutil.rmtree(weights_dir)
    export(run_dir, weights_dir, which="teacher")
    _log(f"pretrain: {run_dir.name} finished {result.step} steps in {wall:.0f} s "
         f"({wall / max(result.step, 1):.2f} s/step); teacher exported to {weights_dir}")
    return {**info, "reused": False, "wall_s": round(wall, 1), **run_summary(run_dir)}


def pretrain_runs(args: argparse.Namespace,
                  configs: dict[tuple[str, int], dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every run of ``configs`` (from ``run_configs``) under ``--out``, one after another or ``--jobs`` at a
    time in their own processes; each is seeded by its config alone, so the results do not depend on it."""
    out: Path = args.out
    calls = [(cfg, out / "runs" / f"{method}_s{seed}", out / "weights" / f"{method}_s{seed}", args.reuse)
             for (method, seed), cfg in configs.items()]
    return dict(zip(configs, run_parallel(pretrain_and_export, calls, args.jobs, args.threads), strict=True))


# --------------------------------------------------------------------------- evaluation
def eval_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    settings = {k: dict(v) for k, v in (FAST_EVAL_SETTINGS if args.fast else EVAL_SETTINGS).items()}
    if args.pairs:
        settings["correspondence"]["pairs"] = args.pairs
    if args.shots:
        settings["fewshot-seg"]["shots"] = tuple(args.shots)
    if args.fewshot_steps:
        settings["fewshot-seg"]["steps"] = args.fewshot_steps
    if args.modes:
        settings["fewshot-seg"]["modes"] = tuple(args.modes)
    return settings


def _finite(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else 0.0


def headline_cells(table: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """{title: (protocol, metric, setting)} of the verdict's metrics: correspondence mean error and the
    mean Dice of every few-shot setting."""
    cells = {"correspondence mean error (px)": ("correspondence", "mean error (px)", "all landmarks")}
    for metric in table.loc[table["protocol"] == "fewshot-seg", "metric"].unique():
        cells[f"{metric}, mean"] = ("fewshot-seg", metric, "mean")
    return cells


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Does adamv2 beat random and dino on the headline correspondence error and mean Dice by more than
    the seed spread (difference of means larger than the larger of the two sample sds)?"""
    table = pd.DataFrame(summary["table"])
    out: dict[str, Any] = {}
    heads = headline_cells(table)
    for title, (protocol, metric, setting) in heads.items():
        rows = table[(table["protocol"] == protocol) & (table["metric"] == metric)
                     & (table["setting"] == setting)]
        by = {r["method"]: r for _, r in rows.iterrows()}
        if "adamv2" not in by:
            continue
        a = by["adamv2"]
        sign = 1.0 if a["higher_is_better"] else -1.0
        entry = {}
        for other in ("random", "dino"):
            if other in by:
                b = by[other]
                gain = sign * (a["mean"] - b["mean"])
                spread = max(_finite(a["sd"]), _finite(b["sd"]))
                enough = min(int(a["n"]), int(b["n"])) > 1  # one seed has no spread to beat
                entry[f"vs_{other}"] = {"gain": gain, "spread": spread,
                                        "beats": bool(gain > spread) if enough else None}
        out[title] = entry
    return out


def pool_over_pretraining(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One compare-like summary across pretraining seeds: every cell is the mean over pretraining seeds of
    that seed's mean over evaluation seeds, with its sample sd over pretraining seeds (``n`` = their count),
    so that the verdict's "seed spread" includes the variance of pretraining itself."""
    seeds = sorted(summaries)
    keys = ("protocol", "metric", "setting", "method")
    tables = {s: {tuple(r[k] for k in keys): r for r in summaries[s]["table"]} for s in seeds}
    rows = []
    for key, first in tables[seeds[0]].items():
        per_seed = [_finite(tables[s][key]["mean"]) for s in seeds if key in tables[s]]
        if len(per_seed) != len(seeds):
            continue
        arr = np.asarray(per_seed)
        rows.append({**dict(zip(keys, key, strict=True)), "n": len(arr), "mean": float(arr.mean()),
                     "sd": float(arr.std(ddof=1)) if len(arr) > 1 else float("nan"),
                     "higher_is_better": first["higher_is_better"], "per_seed": per_seed})
    return {"methods": summaries[seeds[0]]["methods"], "pretrain_seeds": seeds, "table": rows}


def paired_gains(pooled: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """adamv2 minus each other method, per pretraining seed (sign: positive is better), as mean and sd of
    the paired differences over pretraining seeds, for the verdict's headline metrics."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    by = {(r["protocol"], r["metric"], r["setting"], r["method"]): r for r in pooled["table"]}
    for title, (protocol, metric, setting) in headline_cells(pd.DataFrame(pooled["table"])).items():
        a = by.get((protocol, metric, setting, "adamv2"))
        if a is None:
            continue
        sign = 1.0 if a["higher_is_better"] else -1.0
        for other in ("random", "dino"):
            b = by.get((protocol, metric, setting, other))
            if b is None:
                continue
            d = sign * (np.asarray(a["per_seed"]) - np.asarray(b["per_seed"]))
            out.setdefault(title, {})[f"vs_{other}"] = {
                "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
                "wins": int((d > 0).sum()), "n": int(len(d))}
    return out


_VERDICT_WORDS = {True: "beats", False: "does not beat", None: "undecided (one seed)"}


def markdown(results: dict[str, Any], headlines: dict[str, str]) -> str:
    lines = [f"# Real radiographs on CPU: random / dino / adamv2 on JSRT ({results['date']})", "",
             f"Pretraining set: {results['data']['cached_images']} real radiographs "
             f"({results['data']['cached_per_source']}), cached at {results['data']['cache_size']} px; "
             f"{results['budget']['steps']} steps of batch {results['budget']['batch_size']} per method; "
             f"pretraining seeds {results['budget']['pretrain_seeds']}, "
             f"evaluation seeds {results['eval']['seeds']}. "
             f"Elapsed {results['elapsed_s'] / 60:.1f} min.", "",
             "Correspondence: val pairs of JSRT, errors in the 1024 px frame; few-shot Dice: support from "
             "the train split, evaluation on the val split (mean ± sd over evaluation seeds).", ""]
    for seed, text in headlines.items():
        lines += [f"## Pretraining seed {seed}", "", "```", text, "```", ""]
        for title, entry in results["verdict"][seed].items():
            parts = [f"vs {k.removeprefix('vs_')}: gain {v['gain']:+.3f} (spread {v['spread']:.3f}) -> "
                     f"{_VERDICT_WORDS[v['beats']]}" for k, v in entry.items()]
            lines.append(f"- adamv2, {title}: " + "; ".join(parts))
        lines.append("")
    pooled = results.get("pooled")
    if pooled:
        lines += ["## Across pretraining seeds", "",
                  "Each cell: mean over pretraining seeds of the per-seed mean over evaluation seeds, "
                  "± sd over pretraining seeds.", "", "```", pooled["headline"], "```", ""]
        for title, entry in pooled["verdict"].items():
            parts = []
            for k, v in entry.items():
                d = pooled["paired"].get(title, {}).get(k, {})
                paired = (f"; paired gain {d['mean']:+.3f} ± {d['sd']:.3f}, better in {d['wins']} of {d['n']}"
                          if d else "")
                parts.append(f"vs {k.removeprefix('vs_')}: gain {v['gain']:+.3f} "
                             f"(spread {v['spread']:.3f}) -> {_VERDICT_WORDS[v['beats']]}{paired}")
            lines.append(f"- adamv2, {title}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def share_random_evaluations(source: Path, report: Path) -> None:
    """Random init does not depend on the pretraining seed: give ``report`` the random-init
    evaluations already made in ``source`` (same evaluation seeds and settings), so ``compare``
    reuses them instead of repeating them (it checks each one's request before reusing it)."""
    done, target = source / "runs" / "random", report / "runs" / "random"
    if done.is_dir() and not target.exists():
        shutil.copytree(done, target)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from holons.eval.report import compare, format_headline
    from holons.eval.results import json_safe
    from holons.files import atomic_write, shared_data_root

    data_root = args.data_root or shared_data_root()
    if data_root is None or not (Path(data_root) / "radiographs" / JSRT / "image_table.csv").is_file():
        raise SystemExit("the shared data folder with radiographs/jsrt_scr was not found; pass --data-root")
    radiographs = Path(data_root).resolve() / "radiographs"
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.reuse:
        raise SystemExit(f"{out} is not empty; pass --reuse to continue in it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stamp = {"start": datetime.now().astimezone().isoformat(timespec="seconds")}

    data_info = prepare_data(args, radiographs)
    _log(f"data: {data_info['cached_images']} images cached ({data_info['cached_per_source']}), "
         f"{data_info['skipped_images']} skipped")

    configs = run_configs(args, out / "cache")
    for (method, seed), cfg in configs.items():
        plan = [(s["mode"], s["levels"], s["steps_per_level"]) for s in cfg["curriculum"]["stages"]]
        # method dino collapses the curriculum into one stage (holons.ssl.config.plan_segments)
        stages = "one level-0 localizability stage" if method == "dino" else f"curriculum {plan}"
        _log(f"pretrain: {method} seed {seed}, {curriculum_steps(cfg)} steps of batch "
             f"{cfg['data']['batch_size']}, {stages}")
    done = pretrain_runs(args, configs)
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in METHODS}
    for (method, seed), cfg in configs.items():
        runs[method][seed] = {"config": str(config_path(args, method)),
                              "curriculum": cfg["curriculum"]["stages"], **done[(method, seed)]}
    first = next(iter(configs.values()))
    arch, batch, budget = first["model"]["backbone"], first["data"]["batch_size"], curriculum_steps(first)
    pretrain_s = time.perf_counter() - started
    torch.set_num_threads(args.jobs * args.threads)  # the pretraining processes have ended

    settings = eval_settings(args)
    eval_device = args.eval_device or args.device
    jsrt = radiographs / JSRT
    summaries, headlines, verdicts = {}, {}, {}
    t_eval = time.perf_counter()
    first_report = None
    for seed in args.pretrain_seeds:
        report = out / "report" if len(args.pretrain_seeds) == 1 else out / "report" / f"pretrain_s{seed}"
        _log(f"compare: pretraining seed {seed}, evaluation seeds {args.seeds} -> {report}")
        if first_report is not None:
            share_random_evaluations(first_report, report)
        first_report = first_report or report
        weights = {"random": "random", **{m: runs[m][seed]["weights"] for m in METHODS}}
        summary = compare(weights, jsrt, report, runs={m: runs[m][seed]["run_dir"] for m in METHODS},
                          arch=arch, seeds=args.seeds,
                          protocols=("correspondence", "fewshot-seg"), settings=settings,
                          device=None if eval_device == "auto" else eval_device, log=_log)
        summaries[seed] = summary
        headlines[seed] = format_headline(summary)
        verdicts[seed] = verdict(summary)
        print(headlines[seed], flush=True)

    pooled = None
    if len(summaries) > 1:
        table = pool_over_pretraining(summaries)
        pooled = {"table": table["table"], "headline": format_headline(table), "verdict": verdict(table),
                  "paired": paired_gains(table)}
        print(pooled["headline"], flush=True)
    results = {
        "date": stamp["start"],
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                    "jobs": args.jobs, "device": args.device, "eval_device": eval_device,
                    "load_avg_at_start": list(os.getloadavg())},
        "command": "benchmarks/real_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": data_info,
        "budget": {"steps": budget, "batch_size": batch, "arch": arch, "pretrain_seeds": args.pretrain_seeds,
                   "overrides": args.overrides,
                   "overrides_adamv2": args.overrides_adamv2, "pretrain_s": round(pretrain_s, 1)},
        "runs": {m: {str(s): r for s, r in v.items()} for m, v in runs.items()},
        "eval": {"data": str(jsrt), "seeds": args.seeds, "settings": settings,
                 "reports": {str(s): v["report"] for s, v in summaries.items()},
                 "eval_s": round(time.perf_counter() - t_eval, 1)},
        "verdict": {str(s): v for s, v in verdicts.items()},
        "pooled": pooled,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    text = markdown(results, {str(s): h for s, h in headlines.items()})
    with atomic_write(out / "results.json", "w") as f:
        json.dump(json_safe(results), f, indent=2)
        f.write("\n")
    with atomic_write(out / "results.md", "w") as f:
        f.write(text)
    _log(f"done in {results['elapsed_s'] / 60:.1f} min; report: {out / 'results.md'} and "
         f"{', '.join(results['eval']['reports'].values())}")
    return results


if __name__ == "__main__":
    main()
