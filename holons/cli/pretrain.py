"""`holons` subcommands. Pretraining and export of foundation weights."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining of a foundation backbone "
                       "(multi-GPU: torchrun --nproc_per_node N -m holons pretrain ...)")
    p.add_argument("--config", type=Path, required=True,
                   help="YAML config, e.g. configs/pretrain/cpu_tiny.yaml")
    p.add_argument("--out", type=Path, required=True,
                   help="run dir (one holding a checkpoint is refused unless --resume or --overwrite; "
                   "the leftovers of a run that stopped before its first checkpoint are cleared)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (bit-exact on CPU)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. data.cache_dir=cache optim.lr=1e-3")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from holons.ssl.trainer import pretrain

    result = pretrain(args.config, args.out, args.overrides, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if result.status == "terminated":  # exit like the signal (143 SIGTERM, 130 SIGINT): the run is not done
        name = signal.Signals(result.signum).name
        print(f"stopped by {name} at step {result.step}/{result.total_steps}; checkpoint written; "
              f"continue with: holons pretrain --config {args.config} --out {args.out} --resume",
              file=sys.stderr)
        return 128 + result.signum
    elif result.status == "stopped":
        print(f"stopped at max_steps: step {result.step}/{result.total_steps}; run dir {args.out}")
    else:
        print(f"pretraining finished: {result.step} steps, {result.nan_steps} skipped (non-finite loss); "
              f"run dir {args.out}, teacher exported to {args.out / 'exported'}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's backbone as timm-loadable "
                       "model.safetensors + config.json")
    p.add_argument("run", type=Path, help="run dir written by `holons pretrain` (or a checkpoint file)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/exported)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="which backbone to export (default: the EMA teacher)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from holons.ssl.export import export

    run, checkpoint = (args.run.parent.parent, args.run) if args.run.is_file() else (args.run, None)
    out = export(run, args.out, which=args.which, checkpoint=checkpoint)
    print(f"exported the {args.which} backbone to {out} (load with timm.create_model('local-dir:{out}', "
          "pretrained=True))")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_pretrain(sub)
    _add_export(sub)
