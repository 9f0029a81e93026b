"""`holons demo`: the main pipeline end to end on built-in synthetic data, resumable step by step."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from holons.errors import HolonsError

DEMO_KARYOGRAM_CASE = "syn00000.01"
# Bumped when the demo's folder layout changes incompatibly; version 2 pretrains on dicom/train only.
DEMO_LAYOUT_VERSION = 3


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline end to end on built-in synthetic data "
                       "(rerun to resume: finished steps are skipped)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo makes")
    p.add_argument("--n", type=int, default=300, help="number of phantom radiographs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data (phantoms and karyotypes); a rerun needs the same one")
    p.add_argument("--fast", action="store_true",
                   help="a miniature run (tiny images, a few steps; about a minute) to check the pipeline; "
                   "its numbers mean nothing")
    p.set_defaults(func=_cmd_demo)


def _configs_dir() -> Path:
    folder = Path(__file__).resolve().parents[2] / "configs"
    if not (folder / "pretrain" / "cpu_tiny.yaml").is_file():
        raise HolonsError(f"the demo needs the repository's configs folder, not found at {folder}; "
                          "run it from a source checkout (pip install -e .)")
    return folder


def demo_pretrain_archive(out: Path) -> Path:
    """The folder the demo indexes for pretraining: the phantoms' train-split DICOMs only.

    The comparison evaluates on the phantoms' val / test images, so those never reach the
    pretraining cache (the generator writes DICOMs to ``dicom/<split>/``).
    """
    return out / "phantoms" / "dicom" / "train"


def demo_steps(out: Path, n: int = 300, seed: int = 0, fast: bool = False) -> list[tuple[str, list[str]]]:
    """The demo as a list of (title, CLI arguments): each step is a command a user could type.

    Full size (about 5-6 minutes on 2 idle cores, longer on a busy machine): 300 phantoms of 256 px,
    the train-split ones (about 70 %) indexed and cached at 128 px, cpu_tiny pretraining (160 steps
    each for ``adamv2`` and ``dino``), the tiny karyotype config, and the comparison over 2 seeds on
    the held-out phantoms.
    ``fast`` shrinks everything to a smoke test. A run folder that holds a checkpoint (an
    interrupted pretraining or karyotype run) gets ``--resume``, so a rerun continues.
    """
    from holons.runs import has_checkpoint

    cfg = _configs_dir()
    size, cache_size, cases = ("64", "64", "12") if fast else ("256", "128", "20")
    # cpu_tiny's stage shares at 160 steps per method: the demo shows the pipeline in about 5 minutes
    # (the 240-step run of configs/studies/anatomy_proof.yaml, 3 seeds, is where the methods are compared).
    pretrain_extra = ["curriculum.stages=[{mode: localizability, levels: [0, 1], steps_per_level: 25}, "
                      "{mode: part_whole, levels: [0, 1], steps_per_level: 55}]"]
    if fast:
        pretrain_extra = [
            "data.batch_size=4", "model.out_dim=128", "model.head_hidden=64", "model.head_bottleneck=32",
            "views.n_local=2", "log_every=1",
            "curriculum.stages=[{mode: localizability, levels: [0], steps_per_level: 1}, "
            "{mode: part_whole, levels: [0], steps_per_level: 1}]",
        ]
    karyo_model = out / "karyotype" / "model"
    karyo_extra = ["--resume"] if has_checkpoint(karyo_model) else []
    if fast:
        karyo_extra += ["data.input_size=32", "train.gnet_epochs=1"]
    steps: list[tuple[str, list[str]]] = [
        ("synthesize chest phantoms",
         ["synth", "radiographs", "--out", str(out / "phantoms"), "--n", str(n), "--seed", str(seed),
          "--size", size]),
        ("synthesize karyotypes for training",
         ["synth", "karyotypes", "--out", str(out / "karyotypes"), "--cases", cases, "--seed", str(seed)]),
        ("synthesize new karyotypes to predict",
         ["synth", "karyotypes", "--out", str(out / "karyotypes_new"), "--cases", "3",
          "--seed", str(seed + 1), "--abnormal-rate", "0.5"]),
        ("index the phantoms' train-split DICOMs (val / test are held out for evaluation)",
         ["index", str(demo_pretrain_archive(out)), "--out", str(out / "manifest.parquet"),
          "--secret-file", str(out / "site_secret.txt")]),
        ("decode once into the cache (all of it for pretraining: the held-out split is already apart)",
         ["cache", str(out / "manifest.parquet"), "--out", str(out / "cache"), "--size", cache_size,
          "--split-fractions", "1", "0", "0"]),
    ]
    for method, config in (("adamv2", "cpu_tiny.yaml"), ("dino", "cpu_tiny_dino.yaml")):
        steps.append((f"pretrain {method} (cpu_tiny)",
                      ["pretrain", "--config", str(cfg / "pretrain" / config),
                       "--out", str(out / "runs" / method), f"data.cache_dir={out / 'cache'}",
                       *(["--resume"] if has_checkpoint(out / "runs" / method) else []), *pretrain_extra]))
    for method in ("adamv2", "dino"):
        steps.append((f"export the {method} teacher backbone",
                      ["export", str(out / "runs" / method), "--out", str(out / "weights" / method)]))
    steps += [
        ("train the karyotype model on synthetic cells",
         ["karyotype", "train", "--config", str(cfg / "finetune" / "karyotype_cpu_tiny.yaml"),
          "--data", str(out / "karyotypes" / "manifest.csv"), "--out", str(karyo_model), *karyo_extra]),
        ("predict and dispatch the new cells",
         ["karyotype", "predict", "--model", str(karyo_model),
          "--data", str(out / "karyotypes_new" / "manifest.csv"),
          "--out", str(out / "karyotype" / "predictions")]),
        ("draw a karyogram",
         ["karyotype", "karyogram", "--predictions", str(out / "karyotype" / "predictions"),
          "--case", DEMO_KARYOGRAM_CASE,
          "--out", str(out / "karyotype" / f"karyogram_{DEMO_KARYOGRAM_CASE}.png")]),
        ("compare random / dino / adamv2: correspondence, few-shot segmentation -> report",
         ["evaluate", "compare", "--weights", "random", f"dino={out / 'weights' / 'dino'}",
          f"adamv2={out / 'weights' / 'adamv2'}", "--runs", f"dino={out / 'runs' / 'dino'}",
          f"adamv2={out / 'runs' / 'adamv2'}", "--data", str(out / "phantoms"), "--out", str(out / "report"),
          "--seeds", "0", "1", *(["--fast"] if fast else [])]),
    ]
    return steps


# Rough relative cost of each kind of step in the full-size demo (2 cores); the time-left estimate
# scales them by how long the steps run so far actually took, so only their proportions matter.
STEP_COST = {"synth": 2.0, "index": 0.5, "cache": 1.0, "pretrain": 25.0, "export": 0.3,
             "karyotype train": 3.0, "karyotype": 0.5, "evaluate": 25.0}


def step_cost(argv: list[str]) -> float:
    """Relative cost of a demo step (``STEP_COST``, by its subcommand)."""
    return STEP_COST.get(" ".join(argv[:2]), STEP_COST.get(argv[0], 1.0))


def time_left(costs: list[float], seconds: list[float | None]) -> float | None:
    """Seconds the steps after ``len(seconds)`` should take: their costs at the pace of the steps timed
    so far (``None``: skipped, not timed). None until a step worth timing has run."""
    timed = [(c, s) for c, s in zip(costs[:len(seconds)], seconds, strict=True) if s is not None]
    spent_cost = sum(c for c, _ in timed)
    if spent_cost < 1.0:
        return None
    return sum(costs[len(seconds):]) * sum(s for _, s in timed) / spent_cost


def _step_key(argv: list[str]) -> list[str]:
    """What identifies a finished step: its arguments without the resume flag added on reruns."""
    return [a for a in argv if a != "--resume"]


def _step_output(argv: list[str]) -> Path | None:
    return Path(argv[argv.index("--out") + 1]) if "--out" in argv else None


def _load_demo_state(path: Path, settings: dict) -> dict:
    """The demo's record of finished steps; a folder made with other settings is refused."""
    import json

    if not path.is_file():
        return {"settings": settings, "done": []}
    try:
        state = json.loads(path.read_text())
        done = [list(map(str, a)) for a in state["done"]]
    except (ValueError, KeyError, TypeError):
        return {"settings": settings, "done": []}
    made_with = state.get("settings") or {}
    if made_with.get("layout") != settings.get("layout"):
        raise HolonsError(f"{path.parent} holds a demo made by another holons version with another folder "
                          "layout; use another --out or delete that folder")
    if made_with != settings:
        made = ", ".join(f"{k} {v}" for k, v in made_with.items() if k != "layout")
        raise HolonsError(f"{path.parent} holds a demo made with other settings ({made}); "
                          "use another --out or delete that folder")
    return {"settings": settings, "done": done}


def _demo_summary(out: Path) -> str:
    """The closing table: the comparison's headline numbers and the karyotyping results."""
    import json

    from holons.eval.report import format_headline

    lines = []
    summary_file = out / "report" / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        lines += ["foundation weights (phantoms; mean ± sd over seeds):", format_headline(summary)]
    metrics_file = out / "karyotype" / "model" / "eval" / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        lines.append(f"karyotyping (held-out synthetic cells, {m.get('test_chromosomes', '?')} chromosomes): "
                     f"type accuracy {m.get('type_accuracy', float('nan')):.3f}, polarity "
                     f"{m.get('polarity_accuracy', float('nan')):.3f}, per case with optimal dispatch "
                     f"{m.get('case_accuracy_optimal', float('nan')):.3f}")
    cases = sorted((out / "karyotype" / "predictions" / "cases").glob("*.json"))
    if cases:
        warned = []
        for c in cases:
            record = json.loads(c.read_text())
            if record.get("warnings"):
                warned.append(f"{c.stem}: {'; '.join(map(str, record['warnings']))}")
        lines.append(f"new cells predicted: {len(cases)}, with warnings: {len(warned)}"
                     + "".join(f"\n  {w}" for w in warned))
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    import hashlib
    import json
    import shlex
    import time

    from holons.files import atomic_write

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "demo_state.json"
    state = _load_demo_state(state_file, {"n": args.n, "seed": args.seed, "fast": args.fast,
                                          "layout": DEMO_LAYOUT_VERSION})
    secret_file = out / "site_secret.txt"
    if not secret_file.exists():
        # The demo's data are synthetic, so its "site secret" is derived from the seed: the
        # pseudonyms, and with them the cache's patient-level splits, are then reproducible.
        # A real site uses a random secret kept outside the data (see `holons index --help`).
        secret_file.write_text(hashlib.sha256(f"holons-demo-site-{args.seed}".encode()).hexdigest() + "\n")
        secret_file.chmod(0o600)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    steps = demo_steps(out, n=args.n, seed=args.seed, fast=args.fast)
    times: list[tuple[str, str]] = []
    costs, seconds = [step_cost(argv) for _, argv in steps], []
    for i, (title, argv) in enumerate(steps, 1):
        target = _step_output(argv)
        key = _step_key(argv)
        if key in state["done"] and (target is None or target.exists()):
            print(f"\n[{i}/{len(steps)}] {title}: done in an earlier run, skipped", flush=True)
            times.append((title, "skipped"))
            seconds.append(None)
            continue
        left = time_left(costs, seconds)
        eta = f" (about {max(1, round(left / 60))} min left)" if left is not None else ""
        print(f"\n[{i}/{len(steps)}] {title}{eta}:\n  holons {shlex.join(argv)}", flush=True)
        t1 = time.perf_counter()
        rc = args.run_command(argv)
        rerun = f"rerun `holons demo` with the same arguments to continue from step {i}"
        if rc == 130:
            print(f"demo interrupted during step {i} ({title}); {rerun}", file=sys.stderr)
            return rc
        if rc != 0:
            print(f"demo stopped: step {i} ({title}) failed with exit status {rc}; fix the cause and {rerun}",
                  file=sys.stderr)
            return rc
        seconds.append(time.perf_counter() - t1)
        times.append((title, f"{seconds[-1]:.0f} s"))
        state["done"] = [a for a in state["done"] if a != key] + [key]
        with atomic_write(state_file, "w") as f:
            json.dump(state, f, indent=1)
    width = max(len(t) for t, _ in times)
    print("\nsteps:")
    for title, took in times:
        print(f"  {title.ljust(width)}  {took:>8}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s (load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs); outputs in {out.resolve()}")
    print(_demo_summary(out))
    report = (out / "report").resolve()
    print(f"\nreport: {report / 'report.md'}  (plots in {report / 'plots'})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_demo(sub)
