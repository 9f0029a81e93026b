"""`holons distill`: dataset distillation (distribution / gradient / trajectory matching, FYI's flip)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a labelled set into a few synthetic images per class "
                       "(distribution, gradient or trajectory matching, optional FYI flip), then evaluate "
                       "them")
    p.add_argument("--data", type=Path, required=True,
                   help="karyotype manifest CSV (pki-3, synthetic karyotypes), a radiograph set folder with "
                   "image_table.csv (phantoms, JSRT) or a path,label CSV")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder (distilled/ PNGs + manifest.csv, distill.json, checkpoints/)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (keys: data, net, match, experts, evaluate)")
    p.add_argument("--ipc", type=int, default=None,
                   help="synthetic images per class (match.ipc; e.g. 1, 10, 50)")
    p.add_argument("--iterations", type=int, default=None, help="matching iterations (match.iterations)")
    p.add_argument("--method", choices=["dm", "gm", "mtt"], default=None,
                   help="dm: distribution matching (default), gm: gradient matching, mtt: matching the "
                   "training trajectories of expert networks (match.method)")
    p.add_argument("--fyi", action="store_true",
                   help="FYI's flip: each image is also matched mirrored (match.fyi)")
    p.add_argument("--eval-seeds", type=int, nargs="*", default=None,
                   help="seeds of the evaluation (evaluate.seeds; none: no evaluation)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("overrides", nargs="*",
                   help="config overrides key.sub=value (e.g. data.size=32 net.width=64)")
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from holons.finetune.distill.api import DistillInterrupted, distill

    flags = {"match.ipc": args.ipc, "match.iterations": args.iterations, "match.method": args.method,
             "match.fyi": True if args.fyi else None,
             "evaluate.seeds": None if args.eval_seeds is None else list(args.eval_seeds)}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        result = distill(args.config, data=args.data, out=args.out, overrides=overrides, resume=args.resume,
                         overwrite=args.overwrite)
    except DistillInterrupted as e:  # state saved; exit like the signal (143 SIGTERM, 130 SIGINT)
        print(f"holons distill: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"wrote {result.summary['ipc']} images per class for {len(result.summary['classes'])} classes: "
          f"{result.manifest}")
    for arm, m in (result.evaluation or {}).get("arms", {}).items():
        print(f"{arm:>9}: test accuracy {m['accuracy_mean']:.4f} +- {m['accuracy_sd']:.4f} "
              f"({m['train_images']} training images, {len(m['accuracy_per_seed'])} seeds)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_distill(sub)
