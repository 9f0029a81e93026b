"""Run one API call of a study step in this (child) process: ``python -m holons.study.call MODULE:FUNCTION
JSON_KWARGS``. The runner starts it like any command, so logs, parallel jobs and signals work the same.

A ``HolonsError`` prints one line and exits 2; a ``SystemExit`` raised by the function (e.g. 128 + a
signal after a checkpoint) is its exit status.
"""

from __future__ import annotations

import importlib
import json
import sys

from holons.errors import HolonsError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or ":" not in argv[0]:
        print("usage: python -m holons.study.call MODULE:FUNCTION JSON_KWARGS", file=sys.stderr)
        return 2
    module, _, name = argv[0].partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        fn(**json.loads(argv[1]))
    except HolonsError as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except (ImportError, AttributeError) as e:
        print(f"{argv[0]}: cannot call it: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
