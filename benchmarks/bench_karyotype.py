"""Benchmark: karyotype inference (chromosomes/s on CPU) and per-case dispatch time.

Measured in one run, with references from the same run:

- inference: the Varifocal model (G-Net + localizer + zoom + L-Net + fusion) against the G-Net
  alone, same backbone and input size, batches of ``--batch`` preprocessed chromosomes, no grad;
- preprocessing: stain normalisation + canvas + resize of rendered synthetic chromosomes;
- dispatch of a 46-chromosome case: greedy and optimal (``dispatch_case``, including sex
  inference and warnings) against plain arg-max (no dispatch), on realistic probability tables
  (a confident top type with a few confusions per case), and against the 5 ms target.

Weights are random (speed does not depend on them). Run::

    .venv/bin/python benchmarks/bench_karyotype.py                      # about a minute
    .venv/bin/python benchmarks/bench_karyotype.py --config configs/finetune/karyotype_pki3_cpu.yaml
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime
from typing import Any

import numpy as np
import torch

from holons.config import load_config
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.data import chromosome_array
from holons.finetune.karyotype.dispatch import dispatch_case
from holons.finetune.karyotype.model import VarifocalNet


def _throughput(fn, n_items: int, min_seconds: float) -> float:
    fn()  # warm-up
    runs, t0 = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return runs * n_items / elapsed


def _case_tables(n_cases: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    types = np.asarray([t for t in range(22) for _ in range(2)] + [22, 23])
    tables = []
    for _ in range(n_cases):
        logits = rng.normal(0, 1, (46, 24))
        logits[np.arange(46), types] += 6.0
        swap = rng.choice(46, 3, replace=False)  # a few confusions with a neighbouring type
        logits[swap, np.clip(types[swap] + 1, 0, 23)] += 6.5
        p = np.exp(logits - logits.max(1, keepdims=True))
        tables.append(p / p.sum(1, keepdims=True))
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/finetune/karyotype_pki3_cpu.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch default; 1 avoids oversubscription on shared CPUs)")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(KaryotypeConfig, args.config)
    size = cfg.data.source_size
    x = torch.rand(args.batch, 1, size, size) * (torch.rand(args.batch, 1, size, size) > 0.8)

    results: dict[str, Any] = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "config": args.config, "input_size": cfg.data.input_size,
        "g_backbone": cfg.model.g_backbone, "l_backbone": cfg.model.l_backbone, "batch": args.batch,
    }
    varifocal = VarifocalNet(cfg.model.__class__(**{**cfg.model.__dict__, "variant": "varifocal"}),
                             cfg.data.input_size).eval()
    g_only = VarifocalNet(cfg.model.__class__(**{**cfg.model.__dict__, "variant": "g_only"}),
                          cfg.data.input_size).eval()
    with torch.inference_mode():
        results["varifocal_chromosomes_per_s"] = _throughput(
            lambda: varifocal.predict_logits(x, "fusion"), args.batch, args.min_seconds)
        results["g_only_chromosomes_per_s"] = _throughput(
            lambda: g_only.predict_logits(x, "g"), args.batch, args.min_seconds)
    r = results
    r["varifocal_vs_g_only"] = r["varifocal_chromosomes_per_s"] / r["g_only_chromosomes_per_s"]

    from holons.data.synthetic.chromosomes import render_chromosome

    rng = np.random.default_rng(args.seed)
    raw = [render_chromosome(rng, k) / 255.0 for k in range(1, 25)]
    canvas = 168
    results["preprocess_chromosomes_per_s"] = _throughput(
        lambda: [chromosome_array(r, stain="gband", canvas=canvas, size=size) for r in raw], len(raw),
        args.min_seconds / 3)

    tables = _case_tables(args.cases, args.seed)
    for method in ("none", "greedy", "optimal"):
        t0 = time.perf_counter()
        for p in tables:
            dispatch_case(p, method)
        results[f"dispatch_{method}_ms_per_case"] = (time.perf_counter() - t0) / len(tables) * 1e3
    t0 = time.perf_counter()
    for p in tables:
        p.argmax(1)
    results["argmax_ms_per_case"] = (time.perf_counter() - t0) / len(tables) * 1e3
    results["optimal_vs_target_5ms"] = results["dispatch_optimal_ms_per_case"] / 5.0
    r["optimal_vs_none"] = r["dispatch_optimal_ms_per_case"] / r["dispatch_none_ms_per_case"]

    print(f"# {results['date']}  {results['machine']}  torch threads {results['torch_threads']}")
    print(f"config {args.config}: {cfg.model.g_backbone}/{cfg.model.l_backbone} at {cfg.data.input_size} px, "
          f"batch {args.batch}")
    print(f"inference  varifocal {results['varifocal_chromosomes_per_s']:8.1f} chromosomes/s   "
          f"G-Net only {r['g_only_chromosomes_per_s']:8.1f} /s   ratio {r['varifocal_vs_g_only']:.2f}")
    print(f"preprocess {r['preprocess_chromosomes_per_s']:8.1f} chromosomes/s (canvas {canvas} -> {size} px)")
    print(f"dispatch per 46-chromosome case: greedy {results['dispatch_greedy_ms_per_case']:.3f} ms, "
          f"optimal {results['dispatch_optimal_ms_per_case']:.3f} ms (target 5 ms: "
          f"{r['optimal_vs_target_5ms']:.2f} of it), no dispatch {r['dispatch_none_ms_per_case']:.3f} ms, "
          f"arg-max only {results['argmax_ms_per_case']:.4f} ms")
    return results


if __name__ == "__main__":
    main()
