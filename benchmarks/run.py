"""Run the benchmarks: ``python benchmarks/run.py [NAME ...] [-- extra args]``.

Each ``benchmarks/bench_NAME.py`` has ``main(argv) -> dict`` that measures the holons path and a
reference in the same run and prints ratios. With no NAME, all benchmarks run with their small
defaults. Record what you measure in ``docs/results.md`` (one row per claim: command, commit, date,
machine) with its numbers in ``results/<name>.json``.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    machine = platform.processor() or platform.machine()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {machine}")
    for name in names:
        print(f"\n## {name}", flush=True)
        importlib.import_module(f"bench_{name}").main(extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
