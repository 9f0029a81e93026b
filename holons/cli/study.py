"""`holons` subcommands. Studies: seed sweeps as parallel jobs, pooled verdicts on a primary metric."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="seed sweeps of several arms as parallel jobs, pooled into mean ± sd "
                       "and verdicts on the spec's primary metric (specs: configs/studies/)")
    ss = p.add_subparsers(dest="study_command", required=True)
    r = ss.add_parser("run", help="run a study spec (a killed study continues with --resume)")
    r.add_argument("spec", type=Path, help="study spec (YAML), e.g. configs/studies/anatomy_proof.yaml")
    r.add_argument("--out", type=Path, required=True, help="study folder: jobs/, logs/, state/, the record")
    r.add_argument("--jobs", type=int, default=None, help="jobs at a time (default: the spec's 'jobs')")
    r.add_argument("--resume", action="store_true",
                   help="continue the study in --out: finished jobs are reused, unfinished ones continue")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="replace one of the spec's vars (repeatable; YAML values)")
    r.add_argument("--arms", nargs="+", default=None, help="run these arms only (default: all)")
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="run these seeds (default: the spec's)")
    r.set_defaults(func=_cmd_run)
    q = ss.add_parser("report", help="pool the finished jobs of a study folder into <name>.json and "
                      "<name>.md")
    q.add_argument("out", type=Path, help="study folder written by `holons study run`")
    q.set_defaults(func=_cmd_report)


def _cmd_run(args: argparse.Namespace) -> int:
    import sys

    from holons.errors import HolonsError
    from holons.study import StudyInterrupted, run_study

    if args.jobs is not None and args.jobs < 1:
        raise HolonsError(f"--jobs must be at least 1, got {args.jobs}")
    try:
        record = run_study(args.spec, args.out, jobs=args.jobs, resume=args.resume, overrides=args.overrides,
                           arms=args.arms, seeds=args.seeds, command=_command(args))
    except StudyInterrupted as e:
        print(f"holons study: {e}", file=sys.stderr)
        return 128 + e.signum
    print((args.out / f"{record['study']}.md").read_text())
    failed = [k for k, j in record["jobs"].items() if j["status"] != "done"]
    if failed:
        print(f"holons study: {len(failed)} job(s) not finished: {', '.join(failed)}; "
              f"logs in {args.out / 'logs'}", file=sys.stderr)
        return 1
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reruns this study (for the record)."""
    import shlex

    words = ["holons", "study", "run", str(args.spec), "--out", str(args.out)]
    words += ["--jobs", str(args.jobs)] if args.jobs else []
    for item in args.overrides:
        words += ["--set", item]
    words += ["--arms", *args.arms] if args.arms else []
    words += ["--seeds", *map(str, args.seeds)] if args.seeds else []
    return shlex.join(words)


def _cmd_report(args: argparse.Namespace) -> int:
    from holons.study import report_study

    record = report_study(args.out)
    print((args.out / f"{record['study']}.md").read_text())
    return 0
