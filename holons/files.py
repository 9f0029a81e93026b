"""Small filesystem helpers shared by every layer: atomic writes and the shared-data location."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

DATA_ENV = "HOLONS_DATA"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode() -> int:
    """The permissions a plain ``open()`` would give (mkstemp makes owner-only files)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it over ``path`` only if the block succeeds.

    A killed process therefore never leaves a half-written file that is later read as valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path for writers that need a file name (pyarrow, safetensors, matplotlib).

    The block writes to the yielded path; on success it is fsynced and renamed over ``path``, on
    failure it is removed. Same guarantee as ``atomic_write``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _default_mode())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shared_data_root() -> Path | None:
    """The folder of real development data: ``$HOLONS_DATA``, else ``../shared/data`` if it exists."""
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = (base / ".." / "shared" / "data").resolve()
        if p.is_dir():
            return p
    return None


def read_model_config(folder: str | os.PathLike, *, weights: str, config: str, what: str) -> dict:
    """The JSON ``config`` of a model folder that must also hold ``weights``; one clear error (a
    ``HolonsError`` naming ``what`` the folder should be) when either is missing or unreadable."""
    import json

    from holons.errors import HolonsError

    folder = Path(folder)
    if not (folder / config).is_file() or not (folder / weights).is_file():
        raise HolonsError(f"{folder} is not {what} (needs {weights} and {config})")
    try:
        return json.loads((folder / config).read_text())
    except ValueError as e:
        raise HolonsError(f"{folder / config} is not valid JSON: {e}") from e
