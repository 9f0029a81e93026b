"""Distilled vs random real chromosomes on pki-3 (issue 21): 10 images per type, with and without FYI.

Reads pki-3 once (karyotyping's preparation and fixed slide-disjoint split), distils the training
chromosomes twice (``match.fyi`` off and on, the same seed and budget) and trains the small ConvNet on
each distilled set and on 10 random real chromosomes per type (drawn per seed), testing on the fixed
test split. Writes ``OUT/<variant>/`` run folders and the summary JSON (``--results``).

    OMP_NUM_THREADS=1 python benchmarks/distill_pki3.py --out /tmp/distill_pki3 \
        --results results/distill_pki3.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from holons.config import resolve_config
from holons.files import atomic_write, shared_data_root
from holons.finetune.distill.api import run_distillation
from holons.finetune.distill.config import DistillConfig
from holons.finetune.distill.data import load_real_set


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the two run folders")
    p.add_argument("--results", type=Path, required=True, help="summary JSON to write")
    p.add_argument("--manifest", type=Path, default=None, help="pki-3 manifest (default: the shared data's)")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--real-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.0, help="learning rate of the synthetic images (match.lr)")
    p.add_argument("--eval-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = shared_data_root()
    if args.manifest is None and root is None:
        raise SystemExit("no shared data found: pass --manifest or set HOLONS_DATA")
    manifest = args.manifest or root / "chromosomes" / "pki3_gband" / "manifest.csv"
    base = {"data": {"kind": "karyotype", "size": args.size, "stain": "gband"},
            "net": {"width": args.width},
            "match": {"ipc": args.ipc, "iterations": args.iterations, "real_batch": args.real_batch,
                      "lr": args.lr, "checkpoint_every": 50},
            "evaluate": {"seeds": args.seeds, "steps": args.eval_steps, "batch_size": 128},
            "device": "cpu"}
    t0 = time.perf_counter()
    real = load_real_set(resolve_config(DistillConfig, base).data, manifest, progress=True)
    read_s = time.perf_counter() - t0
    runs = {}
    for name, fyi, arms in (("dm", False, ["distilled", "random"]), ("dm_fyi", True, ["distilled"])):
        cfg = resolve_config(DistillConfig, base, {"match": {"fyi": fyi}, "evaluate": {"arms": arms}})
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        runs[name] = run_distillation(cfg, real, out, progress=True).summary
        print(name, json.dumps(runs[name]["evaluation"]["arms"]), flush=True)
    arms = {"distilled (DM)": runs["dm"]["evaluation"]["arms"]["distilled"],
            "distilled (DM + FYI)": runs["dm_fyi"]["evaluation"]["arms"]["distilled"],
            f"random real ({args.ipc} per type)": runs["dm"]["evaluation"]["arms"]["random"]}
    summary = {
        "date": datetime.date.today().isoformat(),
        "command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv),
        "data": str(manifest), "train_chromosomes": len(real.train_x), "test_chromosomes": len(real.test_x),
        "split": "karyotyping's fixed slide-disjoint split (test 0.2 / val 0.1 of the slides, seed 0; "
                 "val unused)",
        "seeds": args.seeds, "ipc": args.ipc, "size": args.size, "convnet_width": args.width,
        "iterations": args.iterations, "image_lr": args.lr, "real_batch_per_class": args.real_batch,
        "eval_steps": args.eval_steps,
        "arms": arms, "distill_seconds": {k: v["distill_seconds"] for k, v in runs.items()},
        "mean_abs_change_from_init": {k: v["mean_abs_change_from_init"] for k, v in runs.items()},
        "read_seconds": round(read_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
    }
    with atomic_write(args.results, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    for arm, m in arms.items():
        print(f"{arm:>28}: {m['accuracy_mean']:.4f} +- {m['accuracy_sd']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
