"""`holons localize` subcommands: train a weakly supervised localizer, predict maps and boxes, evaluate
them on boxes. Each calls one API function (``holons.finetune.localize.train`` / ``.predict``,
``holons.eval.localize_metrics``).

The method names are listed here rather than read from the registry so that ``holons --help`` does
not import torch (a test checks that both lists agree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("cam", "ppl", "sgma", "pdisconet", "genpromp")


def _add_localize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("localize", help="weakly supervised localization from image-level labels: "
                       f"{' | '.join(METHODS)}")
    ls = p.add_subparsers(dest="action", required=True)
    t = ls.add_parser("train", help="train a localizer and write its model folder")
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
    r = ls.add_parser("predict", help="maps (PNG, source geometry) and boxes (CSV) of images")
    r.add_argument("--model", type=Path, required=True, help="model folder written by `localize train`")
    r.add_argument("images", nargs="+", type=Path, help="image files (PNG, DICOM, ...)")
    r.add_argument("--out", type=Path, required=True, help="folder for boxes.csv and maps/")
    r.add_argument("--box-fraction", type=float, default=0.5,
                   help="box of the largest region above this fraction of the map's maximum (default 0.5)")
    r.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, ...")
    r.set_defaults(func=_cmd_predict)
    e = ls.add_parser("evaluate", help="MaxBoxAccV2, pointing game, top-1 localization and AUC on boxes")
    e.add_argument("--model", type=Path, required=True, help="model folder written by `localize train`")
    e.add_argument("--data", type=Path, required=True, help="phantoms folder, JSRT folder or manifest CSV")
    e.add_argument("--out", type=Path, required=True, help="folder for results.json and items.csv")
    e.add_argument("--split", default=None, help="split to score (default: test, else val, else all)")
    e.add_argument("--tolerance", type=float, default=0.0,
                   help="pointing game: grow boxes by this many pixels (default 0)")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, ...")
    e.set_defaults(func=_cmd_evaluate)


def _cmd_train(args: argparse.Namespace) -> int:
    from holons.finetune.localize.train import train_localizer

    overrides = list(args.overrides) + ([f"method={args.method}"] if args.method else [])
    run = train_localizer(args.config, data=args.data, out=args.out, overrides=overrides, resume=args.resume,
                          overwrite=args.overwrite, progress=args.progress or None)
    print(json.dumps(run.metrics, indent=2))
    print(f"model folder: {run.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from holons.finetune.localize.predict import predict_maps, write_predictions

    prediction = predict_maps(args.model, args.images, box_fraction=args.box_fraction, device=args.device)
    path = write_predictions(prediction, args.out)
    print(f"localized {len(prediction.names)} images; wrote {path} and {args.out / 'maps'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from holons.eval.localize_metrics import format_localize, run_localize_evaluation

    summary = run_localize_evaluation(args.model, args.data, args.out, split=args.split,
                                      tolerance=args.tolerance, device=args.device)
    print(format_localize([summary]))
    print(f"wrote {args.out / 'results.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_localize(sub)
