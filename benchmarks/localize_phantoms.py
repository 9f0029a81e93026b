"""Weakly supervised localization on phantoms: every method against cam, same init, several seeds.

Generates a phantom set (``holons synth radiographs`` defaults but small), trains each method with
``holons.finetune.localize.train.train_localizer`` from the same random init per seed, scores it with
``holons.eval.localize_metrics.evaluate_localizer`` on the test split, and writes
``results/localize_phantoms.json`` (command, seeds, per-seed values, mean and sd, date, hardware).

    python benchmarks/localize_phantoms.py --work /tmp/loc_bench --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from holons.data.synthetic.radiographs import generate_radiographs
from holons.eval.localize_metrics import evaluate_localizer
from holons.finetune.localize import METHODS
from holons.finetune.localize.train import train_localizer

BASE = {"arch": "test_resnet", "image_size": 64, "feature_stage": -3, "steps": 150, "batch_size": 16,
        "lr": 2e-3, "checkpoint_every": 10_000}
OPTIONS = {"genpromp": {"denoise_size": 32, "width": 16, "prompt_dim": 32},
           "sgma": {"part_size": 32}}
REPORTED = ("max_box_acc_v2", "box_acc@0.5", "pointing_game", "top1_localization", "classification_auc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the phantoms and the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (init and training)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to compare")
    parser.add_argument("--finding", default="cardiomegaly", help="phantom finding: cardiomegaly | nodule")
    parser.add_argument("--images", type=int, default=240, help="phantom images to generate")
    parser.add_argument("--steps", type=int, default=BASE["steps"], help="training steps per run")
    parser.add_argument("--out", type=Path, default=Path("results/localize_phantoms.json"),
                        help="results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = args.work / "phantoms"
    if not (data / "image_table.csv").is_file():
        generate_radiographs(data, n=args.images, seed=0, size=BASE["image_size"], images_per_patient=2,
                             findings_rate=0.5, formats=("png",), workers=1, progress=False)
    runs, started = {}, time.time()
    for method in args.methods:
        for seed in args.seeds:
            config = {**BASE, "steps": args.steps, "method": method, "seed": seed, "finding": args.finding,
                      "options": OPTIONS.get(method, {})}
            t0 = time.process_time()
            run = train_localizer(config, data=data, out=args.work / f"{method}_s{seed}", overwrite=True)
            summary, _ = evaluate_localizer(run.out, data, device="cpu")
            runs.setdefault(method, []).append({"seed": seed, **{k: summary[k] for k in REPORTED},
                                                "cpu_s": round(time.process_time() - t0, 1)})
            print(method, seed, {k: round(summary[k], 3) for k in REPORTED}, flush=True)
    table = {m: {k: {"mean": float(np.mean([r[k] for r in rs])),
                     "sd": float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else None}
                 for k in REPORTED} for m, rs in runs.items()}
    result = {
        "command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": 1,
                     "device": "cpu", "note": "shared 2-core machine, one torch thread"},
        "data": {"phantoms": args.images, "size": BASE["image_size"], "finding": args.finding,
                 "split": "test"},
        "config": {**BASE, "steps": args.steps, "options": OPTIONS}, "init": "random test_resnet, seeded",
        "seeds": args.seeds, "runs": runs, "summary": table, "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
