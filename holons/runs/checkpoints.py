"""Training checkpoints: tensors and primitives only, written atomically, read with ``weights_only=True``.

A checkpoint is one ``torch.save`` of a nested dict whose leaves are tensors, numbers, strings,
booleans or None (no pickled classes), so ``torch.load(path, weights_only=True)`` reads it and a
checkpoint from an untrusted source cannot run code. Every checkpoint carries ``format``, the
library ``versions`` and the ``git_commit`` of the holons source (None outside a git checkout), for
provenance (never checked on load). RNG states are stored as tensors or plain lists so that a
resumed CPU run continues bit-exactly.

Two layouts: step-numbered ``step_XXXXXXXX.pt`` files with rotation (:func:`save_checkpoint`,
pretraining), or named files rewritten in place (:func:`write_checkpoint`, karyotype phases).
"""

from __future__ import annotations

import functools
import platform
import random
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from holons.errors import HolonsError
from holons.files import atomic_write

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Library versions recorded in every checkpoint and export (for provenance, not checked)."""
    from holons import __version__

    return {"holons": __version__, "torch": str(torch.__version__), "timm": _version("timm"),
            "numpy": str(np.__version__), "python": platform.python_version()}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the holons source tree (``+dirty`` when it has uncommitted changes), or None
    when holons does not run from a git checkout or git is missing. Asked once per process."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():  # an installed package (even inside someone else's repository)
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def provenance() -> dict[str, Any]:
    """What every checkpoint records about the code that wrote it: ``versions`` and ``git_commit``."""
    return {"versions": versions(), "git_commit": git_commit()}


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, numpy, python) as tensors and primitives."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": int(py_state[0]), "internal": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the device count matches).

    The states may come from a checkpoint loaded onto an accelerator (``map_location="cuda"``);
    every setter takes CPU byte tensors only, so they are brought back to the CPU first.
    """
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.cpu() for c in cuda])


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def write_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically to ``path``, with ``format``, ``versions`` and ``git_commit`` added."""
    payload = {**state, "format": CHECKPOINT_FORMAT, **provenance()}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def save_checkpoint(state: dict[str, Any], ckpt_dir: str | Path, step: int, keep_last: int = 3,
                    keep_steps: set[int] | None = None) -> Path:
    """Write ``state`` as ``step_XXXXXXXX.pt`` (see :func:`write_checkpoint`) and prune old ones.

    ``keep_steps`` (e.g. the stage / level boundaries) are never pruned; of the others the
    ``keep_last`` newest stay (0 keeps all).
    """
    path = write_checkpoint(state, checkpoint_path(ckpt_dir, step))
    if keep_last > 0:
        keep = keep_steps or set()
        periodic = [s for s, _ in list_checkpoints(ckpt_dir) if s not in keep]
        for s in periodic[:-keep_last]:
            checkpoint_path(ckpt_dir, s).unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step-numbered checkpoint in ``ckpt_dir``, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    unversioned_ok: bool = False) -> dict[str, Any]:
    """Read one checkpoint with ``weights_only=True``; a damaged or foreign file is a HolonsError.

    ``unversioned_ok``: also accept a dict without ``format`` (karyotype checkpoints written before
    this module existed), so that runs in progress can still be resumed.
    """
    path = Path(path)
    if not path.is_file():
        raise HolonsError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise HolonsError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    default = CHECKPOINT_FORMAT if unversioned_ok else None
    if not isinstance(state, dict) or state.get("format", default) != CHECKPOINT_FORMAT:
        raise HolonsError(f"{path} is not a holons training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest step-numbered checkpoint in ``ckpt_dir`` (writes are atomic, so it is complete), or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest valid one in a run dir / checkpoints dir."""
    p = Path(path)
    if p.is_file():
        return p
    for d in (p / "checkpoints", p):
        if d.is_dir():
            found = latest_checkpoint(d)
            if found is not None:
                return found
    raise HolonsError(f"no usable checkpoint found at {p}")
