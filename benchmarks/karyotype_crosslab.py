"""Cross-lab karyotyping: the default config on synthetic lab styles, and real data across labs.

Rows (each one ``holons karyotype train`` + ``karyotype predict`` through the Python API):

- ``style:<name>``: synthetic cells of one lab style (``holons synth karyotypes --style``), trained
  and tested on that style (its own group split); the table also gives each style against its
  tight-cropped twin (padded / jpeg / magnified vs gband, qband_padded_dim vs qband).
- ``magnification``: the gband model predicts cells of the ``magnified`` style (1.6x) — with
  ``--scale none`` / ``cell`` rows (suffix ``@scale`` when it differs from the config), whether per-cell
  scale normalization carries a model across magnifications.
- ``pki3->karyonet``: trained on pki-3 (its fixed slide-disjoint split), predicts the karyonet
  G-band sample (another lab: padded 242 px JPEGs).

``--budget F`` multiplies ``train.epoch_steps`` (1.0 = the config as shipped); results say which.

    .venv/bin/python benchmarks/karyotype_crosslab.py --out /tmp/crosslab --styles gband padded \\
        --cases 60 --budget 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from holons.config import load_config
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.data.synthetic.lab_styles import LAB_STYLES
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.predict import predict_karyotypes
from holons.finetune.karyotype.train import train_karyotype

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "karyotype_default.yaml"
TWIN = {"padded": "gband", "jpeg": "gband", "magnified": "gband", "qband_padded_dim": "qband"}
KEYS = ("type_accuracy", "polarity_accuracy", "case_accuracy_optimal", "type_accuracy_optimal")


def overrides(budget: float, base: KaryotypeConfig, extra: list[str]) -> list[str]:
    steps = max(1, round(base.train.epoch_steps * budget)) if base.train.epoch_steps else 0
    return [f"train.epoch_steps={steps}", *extra]


def train_row(name: str, manifest: Path, out: Path, config: Path, over: list[str]) -> dict:
    """Train (or reuse a finished run) and return its test metrics."""
    run = out / "runs" / name
    metrics = run / "eval" / "metrics.json"
    if not metrics.is_file():
        cfg = load_config(KaryotypeConfig, config, over)
        t0 = time.perf_counter()
        summary = train_karyotype(cfg, manifest, run, overwrite=True)
        summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
        with atomic_write(metrics, "w") as f:
            json.dump(summary, f, indent=2)
    summary = json.loads(metrics.read_text())
    return {"row": name, "run": str(run), **{k: summary.get(k) for k in KEYS},
            "train_chromosomes": summary.get("train_chromosomes"),
            "test_chromosomes": summary["test_chromosomes"],
            "canvas": summary.get("canvas"), "wall_seconds": summary.get("wall_seconds"),
            "overrides": over}


def predict_row(name: str, run: Path, manifest: Path, out: Path) -> dict:
    """Predict a labelled manifest with a trained run; the metrics predict computes."""
    result = predict_karyotypes(run, manifest, out / "predict" / name, progress=False)
    m = result["metrics"]
    return {"row": name, "run": str(run), **{k: m.get(k) for k in KEYS},
            "test_chromosomes": m["test_chromosomes"], "data": str(manifest)}


def markdown_table(results: list[Path]) -> str:
    """One markdown table of the rows of several ``results_*.json`` files, with each style's delta
    to its tight-cropped twin."""
    rows = [r for path in results for r in json.loads(Path(path).read_text())["rows"]]
    by_row = {r["row"].removeprefix("style:"): r for r in rows}
    lines = ["| row | type % | polarity % | per case % (optimal) | vs. tight twin | test chromosomes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["row"].removeprefix("style:")
        style, _, suffix = name.partition("@")
        twin = TWIN.get(style)
        twin_row = by_row.get(twin + ("@" + suffix if suffix else "")) if twin else None
        delta = f"{100 * (r['type_accuracy'] - twin_row['type_accuracy']):+.1f} vs {twin}" if twin_row else ""
        pol = "–" if r["polarity_accuracy"] is None else f"{100 * r['polarity_accuracy']:.1f}"
        lines.append(f"| {name} | {100 * r['type_accuracy']:.1f} | {pol} | "
                     f"{100 * r['case_accuracy_optimal']:.1f} | {delta} | {r['test_chromosomes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="folder for data, runs and results_*.json")
    p.add_argument("--config", type=Path, default=DEFAULT,
                   help="karyotype config (default: karyotype_default)")
    p.add_argument("--styles", nargs="*", default=list(LAB_STYLES), help="synthetic lab styles to train on")
    p.add_argument("--cases", type=int, default=60, help="synthetic cells per style")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic cells")
    p.add_argument("--seed", type=int, default=0, help="training seed (train.seed)")
    p.add_argument("--budget", type=float, default=1.0, help="multiplies train.epoch_steps")
    p.add_argument("--scale", choices=["none", "cell"], default=None,
                   help="data.scale of every run (default: the config's)")
    p.add_argument("--magnification", action="store_true",
                   help="also predict magnified cells with the gband model")
    p.add_argument("--pki3", type=Path, default=None,
                   help="pki-3 manifest: train on it, predict --karyonet")
    p.add_argument("--pki3-cases", type=int, default=0,
                   help="data.max_train_cases for the pki-3 run (0: all)")
    p.add_argument("--karyonet", type=Path, default=None, help="karyonet_sample manifest (G-band rows)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--report", type=Path, nargs="*", default=None,
                   help="only print a markdown table of these results_*.json files")
    args = p.parse_args(argv)
    if args.report is not None:
        print(markdown_table(args.report))
        return 0
    if args.out is None:
        p.error("--out is required (except with --report)")

    base = load_config(KaryotypeConfig, args.config)
    args.scale = args.scale or base.data.scale
    common = [f"train.seed={args.seed}", f"train.threads={args.threads}", f"data.scale={args.scale}"]
    over = overrides(args.budget, base, common)
    suffix = "" if args.scale == base.data.scale else f"@{args.scale}"
    rows = []
    data = args.out / "data"
    for style in args.styles:
        manifest = data / style / "manifest.csv"
        if not manifest.is_file():
            generate_karyotypes(data / style, cases=args.cases, seed=args.data_seed, style=style, workers=1)
        rows.append(train_row(f"style:{style}{suffix}", manifest, args.out, args.config, over))
        print(json.dumps(rows[-1]), flush=True)
    if args.magnification:
        mag = data / "magnified" / "manifest.csv"
        if not mag.is_file():
            generate_karyotypes(data / "magnified", cases=args.cases, seed=args.data_seed + 1,
                                style="magnified", workers=1)
        gband = args.out / "runs" / f"style:gband{suffix}"
        rows.append(predict_row(f"gband->magnified{suffix}", gband, mag, args.out))
        print(json.dumps(rows[-1]), flush=True)
    if args.pki3 is not None:
        pki = [*over, f"data.max_train_cases={args.pki3_cases}", "data.stain=auto"]
        rows.append(train_row(f"pki3{suffix}", args.pki3, args.out, args.config, pki))
        print(json.dumps(rows[-1]), flush=True)
        if args.karyonet is not None:
            table = pd.read_csv(args.karyonet)
            gband = table[table["band"] == "Gband"].copy()
            gband["path"] = [str((args.karyonet.parent / p).resolve()) for p in gband["path"]]
            target = args.out / "karyonet_gband.csv"  # absolute paths: the shared folder stays read-only
            gband.to_csv(target, index=False)
            rows.append(predict_row(f"pki3->karyonet_gband{suffix}", args.out / "runs" / f"pki3{suffix}",
                                    target, args.out))
            print(json.dumps(rows[-1]), flush=True)
    record = {"config": str(args.config), "budget": args.budget, "cases_per_style": args.cases,
              "data_seed": args.data_seed, "seed": args.seed, "scale": args.scale, "rows": rows}
    name = f"results_{'_'.join(args.styles) or 'real'}{suffix}.json"
    with atomic_write(args.out / name, "w") as f:
        json.dump(record, f, indent=2)
    by_row = {r["row"].removeprefix("style:"): r for r in rows}
    for style, twin in TWIN.items():
        if style + suffix in by_row and twin + suffix in by_row:
            delta = by_row[style + suffix]["type_accuracy"] - by_row[twin + suffix]["type_accuracy"]
            print(f"{style} vs its twin {twin}: {delta:+.4f} type accuracy")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HolonsError as e:
        print(f"karyotype_crosslab: {e}", file=sys.stderr)
        sys.exit(2)
