"""Ablation table of issue 5, section 5: Varifocal karyotyping on one fixed slide-disjoint test split.

Runs, each trained and evaluated by ``train_karyotype`` in its own folder ``OUT/<name>``:

1. ``g_only``: the G-Net alone (``model.variant=g_only``, reporting its own head whatever the base
   config's ``model.output_head``);
2. ``l_whole``: the L-Net fed the whole chromosome instead of the learned crop, fused with the G-Net;
3. ``varifocal``: G-Net + L-Net on the learned zoom + fusion, random init, CutMix off;
4. ``varifocal_foundation``: as 3 with both backbones from ``--foundation`` (a ``holons export``
   folder; its architecture must be the configured backbones', e.g. ``--set
   model.g_backbone=resnet18 model.l_backbone=resnet18`` for every run); skipped without it;
5. ``varifocal_cutmix``: as 3 with chromosome CutMix on (``train.cutmix_prob=--cutmix-prob``).

Every run uses the same data settings, so the split (``data.split_seed``, slide-disjoint) is the
same; the table says whether the runs' test sets are identical. Overrides apply in the order
base YAML < ``--quick`` < ``--device`` < ``--set`` < the run's own keys (variant, CutMix, init), so
the pairs stay explicit whatever the base config says.

``--folds K`` runs each selected row as a K-fold cross-validation by slide instead (``data.folds=K``,
``data.fold=k``, folders ``OUT/<name>/fold<k>``; validation slides are carved from the training
folds) and reports mean ± sd over the folds; every fold must finish for the row to count.

``--jobs N`` trains the selected rows in N processes side by side (round robin in table order; one
GPU shared, each process's log in ``OUT/jobs/job<k>.log``), then makes the table from their runs as a
rerun would. Split the CPU threads yourself (``--set train.threads=...``): the setting is part of
every run's config, so the table's own pass must see the same value.

Rerunning the script reuses a finished run (same resolved config; a different one is reported as
a failure, never silently mixed in), resumes an interrupted one from its checkpoints, and starts
over a run that failed before its first checkpoint. A failed run is recorded in the table and the
others go on. SIGTERM / SIGINT during training checkpoints the current run and stops the script
(exit 128 + signal); rerun the same command to continue.

The numbers are read from each run's ``eval/metrics.json`` (written by ``train_karyotype``; the
per-case accuracies are means over cases of each case's fraction correct). ``train s`` is that
file's ``train_seconds``: data preparation + training of the last invocation (a resumed run counts
only the part after the resume). Output: ``OUT/results.json`` and ``OUT/results.md``.

    .venv/bin/python benchmarks/karyotype_ablation.py --out runs/ablation_cpu            # pki-3, CPU config
    python benchmarks/karyotype_ablation.py --config configs/finetune/karyotype_pki3_gpu.yaml \\
        --device cuda --out runs/ablation_gpu [--foundation EXPORT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from holons.config import load_config, to_dict
from holons.errors import HolonsError
from holons.files import atomic_write, shared_data_root
from holons.finetune.karyotype.config import KaryotypeConfig

log = logging.getLogger("holons.karyotype.ablation")
DEFAULT_CONFIG = "configs/finetune/karyotype_pki3_cpu.yaml"
PKI3_MANIFEST = "chromosomes/pki3_gband/manifest.csv"
QUICK = ["data.input_size=32", "data.zoom_source_size=64", "data.max_train_cases=4", "train.gnet_epochs=1",
         "train.localizer_epochs=1", "train.lnet_rounds=1", "train.lnet_epochs=1",
         "train.localizer_refine_epochs=1", "train.fusion_epochs=1", "train.val_every=0"]
METRICS = ("type_accuracy", "polarity_accuracy", "macro_f1", "case_accuracy_none", "case_accuracy_greedy",
           "case_accuracy_optimal", "cases_fully_correct_none", "cases_fully_correct_greedy",
           "cases_fully_correct_optimal")


@dataclass(frozen=True)
class AblationRun:
    """One row of the table: a name (its folder), a title and the config keys that make it."""

    name: str
    title: str
    overrides: tuple[str, ...]
    needs_foundation: bool = False


def ablation_runs(foundation: str | Path | None = None, cutmix_prob: float = 0.5) -> list[AblationRun]:
    """The five runs in table order (see the module doc)."""
    off = "train.cutmix_prob=0.0"
    where = json.dumps(str(foundation))  # a quoted YAML string, whatever the path holds
    init = (f"model.g_pretrained_dir={where}", f"model.l_pretrained_dir={where}") if foundation else ()
    return [
        AblationRun("g_only", "G-Net only", ("model.variant=g_only", "model.output_head=g", off)),
        AblationRun("l_whole", "L-Net on the whole chromosome (+ G-Net fusion)",
                    ("model.variant=l_whole", off)),
        AblationRun("varifocal", "Varifocal (G + L on the learned zoom), random init",
                    ("model.variant=varifocal", off)),
        AblationRun("varifocal_foundation", "Varifocal, holons foundation init",
                    ("model.variant=varifocal", off, *init), needs_foundation=True),
        AblationRun("varifocal_cutmix", f"Varifocal + CutMix (p = {cutmix_prob:g})",
                    ("model.variant=varifocal", f"train.cutmix_prob={cutmix_prob}")),
    ]


VARIANTS = tuple(r.name for r in ablation_runs())


def default_manifest() -> Path | None:
    """The pki-3 manifest under the shared data folder (``$HOLONS_DATA`` or ``../shared/data``)."""
    root = shared_data_root()
    return root / PKI3_MANIFEST if root is not None and (root / PKI3_MANIFEST).is_file() else None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _finished_metrics(run_dir: Path, cfg: KaryotypeConfig) -> dict | None:
    """The saved metrics of a finished run with this config; None when the run is not finished."""
    metrics = run_dir / "eval" / "metrics.json"
    if not (metrics.is_file() and (run_dir / "model" / "model.safetensors").is_file()):
        return None
    saved = _flat(to_dict(load_config(KaryotypeConfig, run_dir / "config.yaml")))
    now = _flat(to_dict(cfg))
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        raise HolonsError(f"{run_dir} finished with another config ({', '.join(changed)}); "
                          "remove it or choose another --out")
    return json.loads(metrics.read_text())


def _test_split_id(run_dir: Path) -> str | None:
    """A short hash of the run's test rows (path, case), to show that every run used one split."""
    split = run_dir / "split.csv"
    if not split.is_file():
        return None
    table = pd.read_csv(split, dtype=str)
    test = table[table["split"] == "test"].sort_values("path")
    text = "\n".join(test["path"] + "\t" + test["case_id"])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _row(run: AblationRun, status: str, metrics: dict | None, run_dir: Path, note: str = "") -> dict:
    row: dict[str, Any] = {"name": run.name, "title": run.title, "status": status,
                           "overrides": list(run.overrides), "note": note}
    if metrics:
        row.update({k: metrics.get(k) for k in METRICS})
        row.update({k: metrics.get(k) for k in ("head", "test_chromosomes", "test_cases", "train_chromosomes",
                                                "train_seconds")})
        row["test_split"] = _test_split_id(run_dir)
    return row


def _fold_row(run: AblationRun, fold_rows: list[dict]) -> dict:
    """One row for a cross-validated run: mean (and ``<metric>_sd``) over its folds, the folds kept."""
    failed = [i for i, r in enumerate(fold_rows) if r["status"] not in ("finished", "reused")]
    reused = all(r["status"] == "reused" for r in fold_rows)
    status = "failed" if failed else "reused" if reused else "finished"
    note = "; ".join(f"fold {i}: {fold_rows[i]['note']}" for i in failed)
    row: dict[str, Any] = {"name": run.name, "title": run.title, "status": status,
                           "overrides": list(run.overrides), "note": note, "folds": fold_rows}
    if not failed:
        for k in METRICS:
            values = [float(r[k]) for r in fold_rows]
            row[k], row[f"{k}_sd"] = statistics.fmean(values), statistics.stdev(values)
        for k in ("test_chromosomes", "test_cases", "train_seconds"):
            row[k] = sum(r[k] for r in fold_rows)
        row["head"] = fold_rows[0]["head"]
        row["test_split"] = "+".join(r["test_split"] for r in fold_rows)
    return row


def _train_one(cfg: KaryotypeConfig, manifest: Path, run_dir: Path, progress: bool | None) -> dict:
    from holons.finetune.karyotype.train import train_karyotype

    checkpoints = list((run_dir / "checkpoints").glob("*.pt")) if run_dir.is_dir() else []
    started = run_dir.is_dir() and any(run_dir.iterdir())
    if checkpoints:
        log.info("%s: resuming from %d checkpoint(s)", run_dir.name, len(checkpoints))
    return train_karyotype(cfg, manifest, run_dir, resume=bool(checkpoints),
                           overwrite=started and not checkpoints, progress=progress)


def _device_name(cfgs: list[KaryotypeConfig]) -> str:
    import torch

    wanted = {c.train.device for c in cfgs} or {"auto"}
    cuda = any(d == "auto" or d.startswith("cuda") for d in wanted) and torch.cuda.is_available()
    name = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    return f"{name} (train.device={'/'.join(sorted(wanted))}, torch {torch.__version__})"


def run_ablation(config: str | Path, manifest: str | Path, out: str | Path, *,
                 variants: list[str] | None = None, device: str | None = None, sets: list[str] | None = None,
                 foundation: str | Path | None = None, quick: bool = False, cutmix_prob: float = 0.5,
                 folds: int = 0, progress: bool | None = None) -> dict:
    """Train and evaluate the selected runs; write ``out/results.json`` and ``out/results.md``.

    Returns the results (``runs``: one dict per row, with ``status`` finished / reused / failed /
    skipped / interrupted). A :class:`~holons.finetune.karyotype.train.KaryotypeInterrupted` is
    re-raised after the results so far are written.
    """
    from holons.finetune.karyotype.train import KaryotypeInterrupted

    out, manifest = Path(out), Path(manifest)
    if not manifest.is_file():
        raise HolonsError(f"manifest not found: {manifest}")
    if not 0.0 < cutmix_prob <= 1.0:
        raise HolonsError(f"--cutmix-prob must be in (0, 1], got {cutmix_prob}")
    if foundation is not None:
        foundation = Path(foundation).resolve()
        if not (foundation / "config.json").is_file():
            raise HolonsError(f"--foundation {foundation} is not a `holons export` folder (no config.json)")
    selected = list(variants or VARIANTS)
    unknown = [v for v in selected if v not in VARIANTS]
    if unknown:
        raise HolonsError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if folds == 1 or folds < 0:
        raise HolonsError(f"--folds must be 0 (the fixed split) or at least 2, got {folds}")
    runs = [r for r in ablation_runs(foundation, cutmix_prob) if r.name in selected]
    common = (QUICK if quick else []) + ([f"train.device={device}"] if device else []) + list(sets or [])
    # (config, folder) per fold of each run (one unit without --folds), every config built before any
    # training: a bad key stops the script at once
    fold_keys = [[f"data.folds={folds}", f"data.fold={k}"] for k in range(folds)] if folds else [[]]
    units = {r.name: [(load_config(KaryotypeConfig, config, common + list(r.overrides) + keys),
                       out / r.name / f"fold{k}" if folds else out / r.name)
                      for k, keys in enumerate(fold_keys)] for r in runs}
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "config": str(config), "manifest": str(manifest),
        "device": _device_name([c for u in units.values() for c, _ in u]),
        "machine": platform.processor() or platform.machine(), "quick": quick, "sets": list(sets or []),
        "cutmix_prob": cutmix_prob, "folds": folds, "foundation": str(foundation) if foundation else None,
        "runs": [],
    }
    for i, run in enumerate(runs, 1):
        log.info("== %d/%d %s: %s", i, len(runs), run.name, run.title)
        if run.needs_foundation and foundation is None:
            note = "no --foundation given (a `holons export` folder); row 3 is random init"
            results["runs"].append(_row(run, "skipped", None, out / run.name, note))
            _write(out, results)
            continue
        fold_rows = []
        for cfg, run_dir in units[run.name]:
            try:
                fold_rows.append(_run_unit(run, cfg, manifest, run_dir, progress))
            except KaryotypeInterrupted as e:
                results["runs"].append(_row(run, "interrupted", None, run_dir, str(e)))
                _write(out, results)
                raise
        results["runs"].append(_fold_row(run, fold_rows) if folds else fold_rows[0])
        _write(out, results)
    return results


def _run_unit(run: AblationRun, cfg: KaryotypeConfig, manifest: Path, run_dir: Path,
              progress: bool | None) -> dict:
    """Reuse, resume or train one run folder; a failure becomes a ``failed`` row (interruptions raise)."""
    from holons.finetune.karyotype.train import KaryotypeInterrupted

    t0 = time.perf_counter()
    try:
        metrics = _finished_metrics(run_dir, cfg)
        status = "reused"
        if metrics is None:
            _train_one(cfg, manifest, run_dir, progress)
            metrics, status = json.loads((run_dir / "eval" / "metrics.json").read_text()), "finished"
        return _row(run, status, metrics, run_dir)
    except KaryotypeInterrupted:
        raise
    except Exception as e:  # one failed run is recorded; the others still run
        log.error("%s failed after %.0f s: %s: %s", run_dir.name, time.perf_counter() - t0,
                  type(e).__name__, e)
        row = _row(run, "failed", None, run_dir, f"{type(e).__name__}: {e}")
        row["traceback"] = traceback.format_exc(limit=8)
        return row


# --------------------------------------------------------------------------- output
TABLE_RATES = ("type_accuracy", "polarity_accuracy", "case_accuracy_none", "case_accuracy_greedy",
               "case_accuracy_optimal", "cases_fully_correct_optimal")
"""The percentage columns of the table, in order (macro-F1 goes between the second and third)."""


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" if sd is None else f"{100 * v:.1f} ± {100 * sd:.1f} %"


def results_markdown(results: dict) -> str:
    """The table (one row per run) with the settings it was made with and notes on skipped or failed runs."""
    lines = [
        f"Ablation ({results['date']}): config `{results['config']}`, manifest `{results['manifest']}`, "
        f"device {results['device']}" + (", **quick** (tiny smoke run: its numbers mean nothing)"
                                         if results["quick"] else "") + ".",
    ]
    if results["sets"]:
        lines.append(f"Overrides for all runs: `{' '.join(results['sets'])}`.")
    if results.get("folds"):
        lines.append(f"{results['folds']}-fold cross-validation by slide: mean ± sd over the folds; test "
                     "counts and train seconds are sums over the folds.")
    lines += ["", "| run | head | type acc | polarity acc | macro-F1 | per-case acc, no dispatch | greedy "
              "| optimal | cases fully correct (optimal) | train s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results["runs"]:
        f1 = "–" if r.get("macro_f1") is None else f"{r['macro_f1']:.3f}"
        if r.get("macro_f1_sd") is not None:
            f1 += f" ± {r['macro_f1_sd']:.3f}"
        secs = "–" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        rates = [_pct(r.get(k), r.get(f"{k}_sd")) for k in TABLE_RATES]
        cells = " | ".join([*rates[:2], f1, *rates[2:]])
        lines.append(f"| {r['title']} | {r.get('head') or '–'} | {cells} | {secs} | {r['status']} |")
        if r.get("note"):
            notes.append(f"- `{r['name']}` ({r['status']}): {r['note']}")
    splits = {r.get("test_split") for r in results["runs"] if r.get("test_split")}
    done = [r for r in results["runs"] if r.get("test_split")]
    if done:
        r = done[0]
        same = "yes" if len(splits) == 1 else f"NO ({len(splits)} different test sets)"
        lines += ["", f"Test split: {r['test_chromosomes']} chromosomes in {r['test_cases']} cases; "
                  f"identical in every run: {same} (id {', '.join(sorted(splits))})."]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict) -> None:
    with atomic_write(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    with atomic_write(out / "results.md", "w") as f:
        f.write(results_markdown(results))


# --------------------------------------------------------------------------- side by side
def job_variants(variants: list[str], jobs: int) -> list[list[str]]:
    """The rows each of ``jobs`` processes trains: round robin in table order, no empty job."""
    chunks = [variants[k::jobs] for k in range(jobs)]
    return [c for c in chunks if c]


def run_jobs(argv: list[str], out: Path, chunks: list[list[str]]) -> int:
    """Run this script once per chunk of rows (``argv`` without ``--variants`` / ``--jobs``), side by
    side. The processes have their own sessions, so a terminal's Ctrl-C or a ``timeout`` reaches
    them once, passed on from here: each checkpoints its run. Returns the first interruption's exit
    code, else 0 (failed runs are recorded by the table's own pass)."""
    logs = out / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for k, chunk in enumerate(chunks):
        with open(logs / f"job{k}.log", "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv,
                                           "--variants", *chunk], stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        log.info("job %d (pid %d): %s; log %s", k, procs[-1].pid, " ".join(chunk), logs / f"job{k}.log")

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for k, rc in enumerate(codes):
        log.info("job %d exited with %d", k, rc)
    stopped = [128 - rc if rc < 0 else rc for rc in codes if rc < 0 or rc >= 128]  # -N: killed by signal N
    return stopped[0] if stopped else 0


def _argv_without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` with each option in ``options`` and its values (up to the next option) removed."""
    kept, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=", 1)[0] in options
            if skipping:
                continue
        if not skipping:
            kept.append(a)
    return kept


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"base config (default {DEFAULT_CONFIG})")
    ap.add_argument("--manifest", type=Path, default=None,
                    help=f"manifest CSV (default: $HOLONS_DATA or ../shared/data / {PKI3_MANIFEST})")
    ap.add_argument("--out", type=Path, required=True, help="output folder: one subfolder per run + results")
    ap.add_argument("--device", default=None, help="train.device for every run: auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run, e.g. train.threads=1 model.g_backbone=resnet18")
    ap.add_argument("--foundation", type=Path, default=None,
                    help="a `holons export` folder for the foundation-init run (skipped without it)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="a subset of the runs")
    ap.add_argument("--cutmix-prob", type=float, default=0.5, help="CutMix probability of the CutMix run")
    ap.add_argument("--folds", type=int, default=0,
                    help="K >= 2: each row as a K-fold cross-validation by slide (mean ± sd over folds)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: 4 training cases, input 32, 1 epoch per step")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train the rows in this many processes side by side, then make the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from holons.finetune.karyotype.train import KaryotypeInterrupted

    manifest = args.manifest or default_manifest()
    if args.jobs < 1:
        print(f"karyotype_ablation: error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    chunks = job_variants(list(args.variants or VARIANTS), args.jobs)
    if len(chunks) > 1:
        rc = run_jobs(_argv_without(list(sys.argv[1:] if argv is None else argv), ("--variants", "--jobs")),
                      args.out, chunks)
        if rc:
            print(f"karyotype_ablation: a job was interrupted (exit {rc}); rerun the same command "
                  "to continue", file=sys.stderr)
            return rc
    try:
        if manifest is None:
            raise HolonsError(f"no --manifest and no shared data with {PKI3_MANIFEST} ($HOLONS_DATA)")
        results = run_ablation(args.config, manifest, args.out, variants=args.variants, device=args.device,
                               sets=args.sets, foundation=args.foundation, quick=args.quick,
                               cutmix_prob=args.cutmix_prob, folds=args.folds)
    except KaryotypeInterrupted as e:
        print(f"karyotype_ablation: {e}\nrerun the same command to continue", file=sys.stderr)
        return 128 + e.signum
    except HolonsError as e:
        print(f"karyotype_ablation: error: {e}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    return 1 if any(r["status"] == "failed" for r in results["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
