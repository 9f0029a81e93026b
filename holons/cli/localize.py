"""Weakly supervised localization on the command line: ``holons finetune localize`` (train) and
``holons evaluate localize`` (score on boxes), ``holons evaluate localize-maps`` (a picture of several
localizers' maps); ``holons predict`` writes a localizer's maps and boxes. Each calls one API function
(``holons.finetune.localize.train``, ``holons.eval.localize_metrics``, ``holons.eval.localize_figure``).

The method names are listed here rather than read from the registry so that ``holons --help`` does
not import torch (a test checks that both lists agree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("cam", "ppl", "sgma", "pdisconet", "genpromp")


def add_finetune_localize(tasks: argparse._SubParsersAction) -> None:
    """``holons finetune localize``: train a weakly supervised localizer (a model folder that
    ``holons predict`` turns into maps and boxes)."""
    t = tasks.add_parser("localize", help="a weakly supervised localizer from image-level labels: "
                         f"{' | '.join(METHODS)} (maps and boxes with `holons predict`)")
    t.add_argument("--method", choices=list(METHODS), default=None,
                   help="localization method (default: the config's, else cam)")
    t.add_argument("--config", type=Path, default=None, help="YAML config (LocalizeConfig keys)")
    t.add_argument("--data", type=Path, required=True,
                   help="phantoms folder, JSRT folder or a manifest CSV (path,label[,split][,x0,y0,x1,y1])")
    t.add_argument("--out", type=Path, required=True, help="run folder = model folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.add_argument("--progress", action="store_true", help="show progress bars")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. init=EXPORT_DIR steps=500 image_size=128 options.parts=4")
    t.set_defaults(func=_cmd_train)


def add_evaluate_localize(protocols: argparse._SubParsersAction) -> None:
    """``holons evaluate localize``: score a localizer's maps and boxes against true boxes."""
    e = protocols.add_parser("localize", help="a localizer's MaxBoxAccV2, pointing game, top-1 "
                             "localization and AUC on boxes")
    e.add_argument("--model", type=Path, required=True, help="model folder written by `finetune localize`")
    e.add_argument("--data", type=Path, required=True, help="phantoms folder, JSRT folder or manifest CSV")
    e.add_argument("--out", type=Path, required=True, help="folder for results.json and items.csv")
    e.add_argument("--split", default=None, help="split to score (default: test, else val, else all)")
    e.add_argument("--tolerance", type=float, default=0.0,
                   help="pointing game: grow boxes by this many pixels (default 0)")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, ...")
    e.set_defaults(func=_cmd_evaluate)
    m = protocols.add_parser("localize-maps", help="a PNG of several localizers' maps and boxes side by side "
                             "on a few held-out images")
    m.add_argument("--model", nargs="+", required=True, metavar="NAME=FOLDER",
                   help="localizer folders (`finetune localize`), each with the column title to show")
    m.add_argument("--data", type=Path, required=True, help="phantoms folder, JSRT folder or manifest CSV")
    m.add_argument("--out", type=Path, required=True, help="PNG file to write")
    m.add_argument("--finding", default=None,
                   help="finding whose true boxes are drawn (default: the one the first model learned)")
    m.add_argument("--split", default=None, help="split to draw from (default: test, else val, else all)")
    m.add_argument("--images", type=int, default=4, help="images (rows) with a true box (default 4)")
    m.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, ...")
    m.set_defaults(func=_cmd_maps)


def _cmd_train(args: argparse.Namespace) -> int:
    from holons.finetune.localize.train import train_localizer

    overrides = list(args.overrides) + ([f"method={args.method}"] if args.method else [])
    run = train_localizer(args.config, data=args.data, out=args.out, overrides=overrides, resume=args.resume,
                          overwrite=args.overwrite, progress=args.progress or None)
    print(json.dumps(run.metrics, indent=2))
    print(f"model folder: {run.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from holons.eval.localize_metrics import format_localize, run_localize_evaluation

    summary = run_localize_evaluation(args.model, args.data, args.out, split=args.split,
                                      tolerance=args.tolerance, device=args.device)
    print(format_localize([summary]))
    print(f"wrote {args.out / 'results.json'}")
    return 0


def _cmd_maps(args: argparse.Namespace) -> int:
    from holons.errors import HolonsError
    from holons.eval.localize_figure import draw_localization_maps

    models = dict(item.partition("=")[::2] for item in args.model)
    bad = [k for k, v in models.items() if not k or not v]
    if bad or len(models) != len(args.model):
        raise HolonsError(f"--model takes distinct NAME=FOLDER items, got {args.model}")
    out = draw_localization_maps(models, args.data, args.out, finding=args.finding, split=args.split,
                                 images=args.images, device=args.device)
    print(f"wrote {out}")
    return 0
