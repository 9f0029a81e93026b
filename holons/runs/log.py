"""A run's record: ``train.log`` + console lines, ``metrics.jsonl``, optional TensorBoard events.

TensorBoard is the optional extra ``holons[tensorboard]``; a trainer's ``tensorboard`` setting is
None (write events when the package is installed), True (asked for: one warning line naming the
extra when it is missing; the run goes on without events) or False (never).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from holons.files import atomic_write

TENSORBOARD_INSTALL = "pip install 'holons[tensorboard]'"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def progress_enabled(progress: bool | None) -> bool:
    """Progress bars on when asked, or by default when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def open_tensorboard(folder: Path, wanted: bool | None, log: logging.Logger, announce: bool = True):
    """A ``SummaryWriter`` on ``folder``, or None (see the module docstring for ``wanted``).

    A missing package is one warning line naming the extra when TensorBoard was asked for, and
    nothing otherwise; a package that is installed but fails to import or to open the folder is
    one warning line either way. ``announce=False`` keeps a reopened log quiet (resume).
    """
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "tensorboard"
        if announce and missing and wanted:
            log.warning("tensorboard: true, but the tensorboard package is not installed: no TensorBoard "
                        "events (%s to write them, or set tensorboard=false)", TENSORBOARD_INSTALL)
        elif announce and not missing:
            log.warning("TensorBoard is installed but cannot be imported, no TensorBoard events: %s",
                        _one_line(e))
        return None
    try:
        return SummaryWriter(str(folder))
    except Exception as e:
        if announce:
            log.warning("cannot write TensorBoard events to %s: %s", folder, _one_line(e))
        return None


class RunLog:
    """``train.log`` (every INFO line) and the console (``echo`` and up) for ``log``, ``metrics.jsonl``
    and TensorBoard, in the run folder ``folder``; inert when ``active`` is False (ranks > 0).

    ``resume_step``: drop the metrics lines written after that step (the checkpoint being resumed;
    they will be written again). ``announce=False`` when the log is reopened within one run, so that
    a TensorBoard warning is said once per run. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, folder: str | Path, log: logging.Logger, *, active: bool = True,
                 echo: int = logging.INFO, tensorboard: bool | None = False, announce: bool = True,
                 resume_step: int | None = None) -> None:
        folder = Path(folder)
        self.log, self.active = log, active
        self.metrics_path = folder / "metrics.jsonl"
        self._handlers: list[logging.Handler] = []
        self.tb = None
        log.setLevel(logging.INFO)
        log.propagate = False
        if not active:
            return
        if resume_step is not None and self.metrics_path.exists():
            self._truncate_metrics(resume_step)
        file_handler = logging.FileHandler(folder / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self._handlers.append(file_handler)
        stream = logging.StreamHandler(sys.stderr)  # INFO lines, or only warnings under a progress bar
        stream.setLevel(echo)
        stream.setFormatter(logging.Formatter("%(message)s"))
        self._handlers.append(stream)
        for h in self._handlers:
            log.addHandler(h)
        self.tb = open_tensorboard(folder / "tb", tensorboard, log, announce)

    def _truncate_metrics(self, step: int) -> None:
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    keep.append(line)
        with atomic_write(self.metrics_path, "w") as f:
            f.write("".join(x + "\n" for x in keep))

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (flushed to disk); its numbers go to TensorBoard at ``record["step"]``."""
        if not self.active:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        for h in self._handlers:
            self.log.removeHandler(h)
            h.close()
        self._handlers = []
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
