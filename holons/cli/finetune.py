"""`holons` subcommands. Fine-tuning radiograph models (classify, segment) and applying them (predict)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from holons.cli.localize import add_finetune_localize

_TASKS = {
    "classify": ("a classifier for the classes (or 0/1 findings) of a manifest CSV, the phantoms or "
                 "the covid set", "manifest CSV (path + label, or path + one 0/1 column per finding; "
                 "optional split) or a phantom / covid folder", "configs/finetune/classify_default.yaml"),
    "segment": ("a segmenter for the structures the data's masks name", "folder with images/ and "
                "masks/<structure>/<id>.png (JSRT, phantoms, your own), or a manifest CSV (path + one "
                "mask-file column per structure)", "configs/finetune/segment_default.yaml"),
}


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a radiograph classifier or segmenter from a foundation "
                       "folder, a timm model or random weights; writes a model folder for `holons predict`")
    tasks = p.add_subparsers(dest="task", required=True)
    add_finetune_localize(tasks)
    for task, (what, data_help, config) in _TASKS.items():
        t = tasks.add_parser(task, help=what)
        t.add_argument("--config", type=Path, default=None,
                       help=f"YAML config (default: the built-in defaults, as in {config})")
        t.add_argument("--data", type=Path, required=True, help=data_help)
        t.add_argument("--out", type=Path, required=True,
                       help="model folder to write (model.safetensors, config.json, metrics.json, train.log)")
        t.add_argument("--resume", action="store_true",
                       help="keep a finished run in --out instead of refusing it (nothing is retrained)")
        t.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
        t.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. init=runs/x/exported mode=frozen shots=8 steps=200")
        t.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from holons import finetune

    run = finetune.classify if args.task == "classify" else finetune.segment
    result = run(args.config, data=args.data, out=args.out, overrides=args.overrides, resume=args.resume,
                 overwrite=args.overwrite)
    shown = {k: v for k, v in result.metrics.items() if k in ("val", "val_dice", "n_train", "n_val")}
    print(json.dumps(shown, indent=1))
    print(f"model folder {result.folder} (apply it with: holons predict {result.folder} IMAGES --out DIR)")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="apply a fine-tuned radiograph model: class probabilities (CSV) or "
                       "masks (PNG + NIfTI in each source image's geometry)")
    p.add_argument("model", type=Path, help="model folder written by `holons finetune classify | segment`")
    p.add_argument("images", type=Path, help="folder of images (searched recursively), one image, or a "
                   "manifest CSV with a path column")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: predictions.csv (classifier) or masks/ + masks.csv (segmenter)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per forward pass (memory only; the predictions do not depend on it)")
    p.add_argument("--threshold", type=float, default=None,
                   help="mask probability threshold (default: the segmenter's own, 0.5 unless "
                   "trained otherwise)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import sys

    from holons.finetune.prediction import predict

    result = predict(args.model, args.images, out=args.out, batch_size=args.batch_size, device=args.device,
                     threshold=args.threshold, report=lambda line: print(line, file=sys.stderr))
    print(f"{result.predicted} image(s) predicted, {len(result.skipped)} skipped; {result.table}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_finetune(sub)
    _add_predict(sub)
