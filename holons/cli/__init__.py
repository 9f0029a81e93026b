"""The ``holons`` command line: one entry point, subcommands mirroring the Python API.

User errors (``HolonsError``) print one clear line and exit with status 2, no traceback.
Heavy modules are imported inside each command so ``holons --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from holons.cli import data, demo, distill, evaluate, finetune, karyotype, pretrain, study
from holons.errors import HolonsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holons", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    # the demo runs its steps through this same entry point (passed down, so cli.demo need not import it)
    parser.set_defaults(run_command=main)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, demo, pretrain, finetune, karyotype, distill, evaluate, study):
        module.register(sub)
    return parser


def _version() -> str:
    from holons import __version__

    return f"holons {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "init_seed", None) is not None and getattr(args, "weights", None) == "random":
        import torch

        torch.manual_seed(args.init_seed)
    try:
        return int(args.func(args) or 0)
    except HolonsError as e:
        print(f"holons {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"holons {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
