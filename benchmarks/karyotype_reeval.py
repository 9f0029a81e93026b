"""Evaluate a trained karyotype run again on its recorded test split: every head, with and without
test-time mirror averaging (``train.test_time_hflip``), without retraining; with ``--vflip`` also
with mirror and upside-down averaging (``train.test_time_vflip``).

    .venv/bin/python benchmarks/karyotype_reeval.py --run RUN_DIR --manifest MANIFEST.csv [--heads g fusion] \
        [--vflip]

Reads ``RUN_DIR/split.csv`` (the rows the run tested on) and ``RUN_DIR/model``; writes
``RUN_DIR/reeval/<head>_<tta>/`` (predictions, confusion matrix) and ``RUN_DIR/reeval/results.json``
and prints one table. The metrics are the same as the training run's own test evaluation
(``holons.finetune.karyotype.evaluate.evaluate_split``, same flip seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from holons.errors import HolonsError
from holons.eval.results import format_table, json_safe
from holons.files import atomic_write
from holons.finetune.karyotype.evaluate import evaluate_split
from holons.finetune.karyotype.model_folder import load_model, run_datasets
from holons.runs import resolve_device

KEYS = ("type_accuracy", "polarity_accuracy", "macro_f1", "case_accuracy_none", "case_accuracy_greedy",
        "case_accuracy_optimal", "cases_fully_correct_optimal")


def load_run_test(run: Path, manifest: Path, device: torch.device):
    """A trained run's model, its metadata and its recorded test rows as a dataset."""
    model, meta = load_model(run, device)
    return model, meta, run_datasets(run, manifest, meta, names=("test",))["test"]


def run_heads(meta: dict, heads: list[str] | None) -> list[str]:
    """The requested heads (default: the model's output head), checked against the model."""
    available = ["g", "l", "fusion", "mean"] if meta["config"]["model"]["variant"] != "g_only" else ["g"]
    for head in heads or [meta["head"]]:
        if head not in available:
            raise HolonsError(f"head {head!r} is not in this model; choose from {available}")
    return heads or [meta["head"]]


def reevaluate(run: Path, manifest: Path, heads: list[str] | None, device: str = "auto",
               vflip: bool = False) -> list[dict]:
    """One row per (head, test-time averaging: none / mirror / with ``vflip`` mirror + upside down) on
    the run's test rows."""
    dev = resolve_device(device)
    model, meta, test = load_run_test(run, manifest, dev)
    cfg = meta["config"]
    rows = []
    for head in run_heads(meta, heads):
        for hflip, vf in [(False, False), (True, False)] + ([(True, True)] if vflip else []):
            name = f"{head}_{'hvflip' if vf else 'hflip' if hflip else 'plain'}"
            s = evaluate_split(model, test, head, dev, run / "reeval" / name, dispatch=cfg["dispatch"],
                               seed=cfg["data"]["split_seed"], batch_size=cfg["train"]["eval_batch_size"],
                               hflip=hflip, vflip=vf)
            rows.append({"head": head, "test_time_hflip": hflip, "test_time_vflip": vf,
                         **{k: s[k] for k in KEYS}})
    with atomic_write(run / "reeval" / "results.json", "w") as f:
        json.dump(json_safe({"run": str(run), "test_chromosomes": len(test), "rows": rows}), f, indent=2)
    return rows


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The options of every script that reads a trained run: run, manifest, heads, device, threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--run", type=Path, required=True, help="a `holons karyotype train` run dir")
    ap.add_argument("--manifest", type=Path, required=True, help="the manifest the run was trained on")
    ap.add_argument("--heads", nargs="+", choices=["g", "l", "fusion", "mean"], default=None,
                    help="heads to use (default: the model's own; mean: G and L probabilities averaged)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--vflip", action="store_true", help="also average with the upside-down image")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = reevaluate(args.run, args.manifest, args.heads, args.device, args.vflip)
    except HolonsError as e:
        print(f"karyotype_reeval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, ["head", "test_time_hflip", "test_time_vflip", *KEYS]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
