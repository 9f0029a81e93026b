"""Run folder rules, shared by every trainer (pretraining, karyotyping, fine-tuning).

``prepare_run(out, resume=..., overwrite=...)``:

- a new or empty folder: a fresh run;
- a folder holding a checkpoint (any ``checkpoints/*.pt``): refused with one line naming
  ``--resume`` (continue it) and ``--overwrite`` (start over);
- a folder holding only what a run writes before its first checkpoint (``train.log``,
  ``config.yaml``, ...) and no checkpoint: the trace of a run that failed early, with nothing to
  resume or protect. Its leftovers are cleared, the folder is reused, and ``Run.cleared`` says so
  (the trainer logs a warning);
- ``resume``: needs a checkpoint (one clear error otherwise);
- ``overwrite``: clears what a run writes, and refuses a folder holding anything else (a mistyped
  ``--out`` pointing at a user's own files is never emptied).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holons.errors import HolonsError
from holons.runs.checkpoints import list_checkpoints

CHECKPOINTS = "checkpoints"
# What every run writes before its first checkpoint (tb/: the optional TensorBoard events).
RUN_ENTRIES = ("config.yaml", "train.log", "metrics.jsonl", "tb", CHECKPOINTS)


@dataclass
class Run:
    """A prepared run folder: where to write, and what ``prepare_run`` found there."""

    dir: Path
    resume: bool = False
    """True when the run continues from the checkpoints in ``checkpoints``."""
    cleared: list[str] = field(default_factory=list)
    """The leftovers of a run that stopped before its first checkpoint, removed (log a warning)."""

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def log_file(self) -> Path:
        return self.dir / "train.log"

    @property
    def metrics_file(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def config_file(self) -> Path:
        return self.dir / "config.yaml"


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The checkpoints of the run in ``folder`` (``checkpoints/*.pt``), by name."""
    d = Path(folder) / CHECKPOINTS
    return sorted(p for p in d.glob("*.pt") if p.is_file()) if d.is_dir() else []


def has_checkpoint(folder: str | Path) -> bool:
    """True when ``folder`` holds a run that can be resumed (``--resume`` is then accepted)."""
    return bool(checkpoint_files(folder))


def _held(out: Path, entries: list[str]) -> str:
    steps = list_checkpoints(out / CHECKPOINTS)
    if steps:
        return f"a checkpoint at step {steps[-1][0]}"
    files = checkpoint_files(out)
    if files:
        return f"the checkpoint {files[-1].name}"
    return ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")


def _clear(out: Path, entries: Sequence[str]) -> None:
    for name in entries:
        p = out / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def prepare_run(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                leftovers: Sequence[str] = (), results: Sequence[str] = (), checkpoints: bool = True) -> Run:
    """Make ``out`` ready for a run under the rules of the module docstring.

    ``leftovers``: further entries this trainer writes before its first checkpoint (cleared with
    ``train.log`` and the rest); ``results``: what a finished run produces (``exported``,
    ``model``): never cleared without ``overwrite``; ``checkpoints=False``: a trainer that keeps
    none (short fine-tuning runs) gets no ``checkpoints/`` folder. Only one process prepares a
    folder (rank 0 of a distributed run; the others make ``Run(out, resume=resume)``).
    """
    out = Path(out)
    if resume and overwrite:
        raise HolonsError("choose either --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise HolonsError(f"run folder {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    checkpoint = has_checkpoint(out)
    run = Run(out, resume=resume)
    if resume:
        if not checkpoint:
            raise HolonsError(f"nothing to resume in {out}: it holds no checkpoint; run without --resume "
                              "to start a new run there")
    elif entries and not checkpoint and set(entries) <= {*RUN_ENTRIES, *leftovers}:
        run.cleared = entries
    elif entries:
        if not overwrite:
            raise HolonsError(f"run folder {out} is not empty (it holds {_held(out, entries)}); pass "
                              "--resume to continue it or --overwrite to start over")
        foreign = [e for e in entries if e not in {*RUN_ENTRIES, *leftovers, *results}]
        if foreign:
            raise HolonsError(f"run folder {out} holds files that are not from a holons run "
                              f"({foreign[0]}, ...); refusing to overwrite it")
        _clear(out, entries)
    _clear(out, run.cleared)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoints:
        run.checkpoints.mkdir(exist_ok=True)
    return run


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between a resumed run's recorded config and the new one.

    Keys that only one side has (settings added to holons since the run started, or dropped)
    take their defaults and do not count; top-level keys in ``ignore`` (run control such as
    ``max_steps``) neither.
    """
    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> list[str]:
        found = []
        for key in sorted(set(a) & set(b)):
            if not prefix and key in ignore:
                continue
            if isinstance(a[key], dict) and isinstance(b[key], dict):
                found += walk(a[key], b[key], f"{prefix}{key}.")
            elif a[key] != b[key]:
                found.append(prefix + key)
        return found

    return walk(old, new, "")
