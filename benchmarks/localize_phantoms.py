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

from holons.data.readers import read_image
from holons.data.synthetic.radiographs import generate_radiographs
from holons.data.weak_labels import load_weak_label_set
from holons.eval.localize_metrics import evaluate_localizer
from holons.finetune.localize import METHODS
from holons.finetune.localize.predict import predict_maps
from holons.finetune.localize.train import train_localizer

BASE = {"arch": "test_resnet", "image_size": 64, "feature_stage": -3, "steps": 150, "batch_size": 16,
        "lr": 2e-3, "checkpoint_every": 10_000}
OPTIONS = {"genpromp": {"denoise_size": 32, "width": 16, "prompt_dim": 32},
           "sgma": {"part_size": 32}}
REPORTED = ("max_box_acc_v2", "box_acc@0.5", "pointing_game", "top1_localization", "classification_auc")


def draw_maps(work: Path, data: Path, methods: list[str], finding: str, out: Path, images: int = 4) -> None:
    """Test phantoms with a finding (columns: the image, then each method's map of the seed-0 run) with
    the true box (green) and the predicted box (red), in the source geometry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    dataset = load_weak_label_set(data, finding)
    chosen = [i for i in dataset.indices("test") if len(dataset.boxes[i])][:images]
    paths = [dataset.paths[i] for i in chosen]
    predictions = {m: predict_maps(work / f"{m}_s0", paths, device="cpu") for m in methods}
    columns = len(methods) + 1
    fig, axes = plt.subplots(len(chosen), columns, figsize=(1.9 * columns, 1.9 * len(chosen)))
    for row, i in enumerate(chosen):
        image = read_image(dataset.paths[i]).pixels
        for col, method in enumerate(["image", *methods]):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            if method != "image":
                ax.imshow(predictions[method].maps[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                x0, y0, x1, y1 = predictions[method].boxes[row]
                if np.isfinite(x0):
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1))
            for x0, y0, x1, y1 in dataset.boxes[i]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(method, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


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
    parser.add_argument("--figure", type=Path, default=None,
                        help="only draw the maps of the seed-0 runs already in --work on a few test images")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = args.work / "phantoms"
    if args.figure is not None:
        draw_maps(args.work, data, args.methods, args.finding, args.figure)
        return 0
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
