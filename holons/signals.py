"""Graceful stop of long jobs: a signal sets a flag; the job checkpoints at its next step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopSignal"]


class StopSignal:
    """Context manager that turns SIGTERM (and, by default, SIGINT) into a ``requested`` flag.

    The training loop polls ``requested`` at step boundaries, saves its state and exits cleanly,
    so a scheduler's SIGTERM or a user's Ctrl-C loses no work. ``signum`` records which signal
    came. A second SIGINT while a stop is already pending raises ``KeyboardInterrupt`` (a forced
    stop without the final checkpoint). Handlers are installed only in the main thread and the
    previous ones are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
