"""`holons` subcommands. Chromosome karyotyping: train, fit-dispatch, predict, evaluate, karyogram."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_karyotype(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("karyotype", help="chromosome karyotyping: train, fit a learned dispatcher, predict "
                       "per case, karyogram")
    ks = p.add_subparsers(dest="action", required=True)
    t = ks.add_parser("train", help="train the Varifocal G-Net / L-Net and evaluate it on the test split")
    t.add_argument("--config", type=Path, default=None,
                   help="YAML config (configs/finetune/karyotype_*.yaml)")
    t.add_argument("--data", type=Path, required=True,
                   help="manifest CSV (pki-3, karyonet or synthetic layout)")
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    t.set_defaults(func=_cmd_karyotype_train)
    r = ks.add_parser("predict", help="predict types and polarity, dispatch per case")
    r.add_argument("--model", type=Path, required=True, help="model folder (or the training run folder)")
    r.add_argument("--data", type=Path, required=True,
                   help="manifest CSV or folder of images (one folder per case)")
    r.add_argument("--out", type=Path, required=True, help="folder for predictions.csv and cases/*.json")
    r.add_argument("--dispatch", choices=["auto", "none", "greedy", "optimal", "learned",
                                          "learned_then_optimal"], default="auto",
                   help="per-case consistency rule for dispatched_class_1to24: auto (default: "
                        "learned_then_optimal when the model has a learned dispatcher, else optimal), "
                        "optimal assignment to the 46 slots, the paper's greedy rule, none (each "
                        "chromosome's top type), learned (the model's learned per-cell dispatcher, see "
                        "fit-dispatch) or learned_then_optimal (the optimal assignment on its output)")
    r.add_argument("--batch-size", type=int, default=256,
                   help="chromosomes per forward pass (memory only; the predictions do not depend on it)")
    r.set_defaults(func=_cmd_karyotype_predict)
    d = ks.add_parser("fit-dispatch", help="train a run's learned per-cell dispatcher and compare it with "
                      "the rule-based dispatch on the test split")
    d.add_argument("--run", type=Path, required=True, help="run folder written by `karyotype train`")
    d.add_argument("--data", type=Path, required=True, metavar="MANIFEST",
                   help="the manifest CSV the run was trained on (its split.csv rows are looked up in it)")
    d.add_argument("--steps", type=int, default=600, help="optimizer steps of the dispatcher (default 600)")
    d.add_argument("--seed", type=int, default=0, help="seed of the dispatcher's training (default 0)")
    d.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    d.set_defaults(func=_cmd_karyotype_fit_dispatch)
    e = ks.add_parser("evaluate", help="evaluate a trained run again on its test split: every head, with "
                      "and without test-time mirror averaging")
    e.add_argument("--run", type=Path, required=True, help="run folder written by `karyotype train`")
    e.add_argument("--data", type=Path, required=True, metavar="MANIFEST",
                   help="the manifest CSV the run was trained on (its split.csv rows are looked up in it)")
    e.add_argument("--heads", nargs="+", choices=["g", "l", "fusion", "mean"], default=None,
                   help="heads to evaluate (default: the model's own; mean: G and L probabilities averaged)")
    e.add_argument("--vflip", action="store_true", help="also average with the mirrored upside-down image")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    e.set_defaults(func=_cmd_karyotype_evaluate)
    g = ks.add_parser("karyogram", help="draw one case's karyogram from predictions")
    g.add_argument("--predictions", type=Path, required=True, help="folder written by `karyotype predict`")
    g.add_argument("--case", required=True, help="case id")
    g.add_argument("--out", type=Path, required=True, help="PNG file")
    g.set_defaults(func=_cmd_karyotype_karyogram)


def _cmd_karyotype_train(args: argparse.Namespace) -> int:
    import json
    import shlex

    from holons.finetune.karyotype import api
    from holons.finetune.karyotype.train import KaryotypeInterrupted

    try:
        run = api.train(args.config, data=args.data, out=args.out, overrides=args.overrides,
                        resume=args.resume, overwrite=args.overwrite)
    except KaryotypeInterrupted as e:  # state saved; exit like the signal (143 SIGTERM, 130 SIGINT)
        command = ["holons", "karyotype", "train"] + (["--config", str(args.config)] if args.config else [])
        command += ["--data", str(args.data), "--out", str(args.out), "--resume", *args.overrides]
        print(f"holons karyotype train: {e}\ncontinue with: {shlex.join(command)}", file=sys.stderr)
        return 128 + e.signum
    print(json.dumps({k: v for k, v in run.metrics.items() if k != "confusion"}, indent=2))
    return 0


def _cmd_karyotype_predict(args: argparse.Namespace) -> int:
    from holons.finetune.karyotype import api

    summary = api.predict(args.model, args.data, args.out, dispatch=args.dispatch,
                          batch_size=args.batch_size).summary
    print(f"predicted {summary['chromosomes']} chromosomes in {summary['cases']} cases "
          f"({summary['skipped']} unreadable, {summary['cases_with_warnings']} cases with warnings); "
          f"wrote {args.out / 'predictions.csv'}")
    if "metrics" in summary:
        m, method = summary["metrics"], summary["dispatch"]
        print(f"labelled manifest: type accuracy {m['type_accuracy']:.4f}, dispatched ({method}) "
              f"{m[f'type_accuracy_{method}']:.4f}, per case {m[f'case_accuracy_{method}']:.4f} "
              f"(all metrics in {args.out / 'metrics.json'})")
    return 0


def _cmd_karyotype_fit_dispatch(args: argparse.Namespace) -> int:
    from holons.finetune.karyotype import api
    from holons.finetune.karyotype.fit_dispatch import REPORT_FILE, format_report

    report = api.fit_dispatch(args.run, args.data, steps=args.steps, seed=args.seed, device=args.device)
    print(format_report(report))
    print(f"saved the dispatcher into the model folder; wrote {args.run / 'eval' / REPORT_FILE} "
          "(use it with `holons karyotype predict --dispatch learned`)")
    return 0


def _cmd_karyotype_evaluate(args: argparse.Namespace) -> int:
    from holons.eval.results import format_table
    from holons.finetune.karyotype import api
    from holons.finetune.karyotype.reeval import REEVAL_KEYS

    rows = api.evaluate(args.run, args.data, heads=args.heads, vflip=args.vflip, device=args.device)
    print(format_table(rows, ["head", "test_time_hflip", "test_time_vflip", *REEVAL_KEYS]))
    print(f"wrote {args.run / 'reeval' / 'results.json'}")
    return 0


def _cmd_karyotype_karyogram(args: argparse.Namespace) -> int:
    from holons.finetune.karyotype import api

    api.karyogram(args.predictions, args.case, args.out)
    print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_karyotype(sub)
