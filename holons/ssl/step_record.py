"""What a pretraining step records: its wall-clock split, the metrics.jsonl line of a log window and
the log line that summarizes it."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from holons.ssl.config import Segment

__all__ = ["StepTimer", "summary_line", "window_record"]


class StepTimer:
    """Wall-clock split of a step; synchronizes CUDA at each lap so that the split is real.

    ``sync=False`` takes host times only (no synchronization, so the host keeps queueing work ahead
    of the GPU); the next synchronized lap then absorbs the queued GPU time, so the sum over a window
    that ends with a synchronized step is still its wall time.
    """

    def __init__(self, device: torch.device, sync: bool = True) -> None:
        self.sync = sync and device.type == "cuda"
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now

    def splits(self) -> dict[str, float]:
        return {f"time_{k}": self.laps.get(k, 0.0) for k in ("transfer", "views", "fwd_bwd", "update")}


def window_record(step: int, seg: Segment, window: list[dict[str, Any]], gb: int, nan_steps: int,
            steps_per_epoch: int) -> dict[str, Any]:
    """One metrics.jsonl line: the mean of each value over the finite steps of the window."""
    finite = [w for w in window if w["finite"]] or window
    keys = [k for k in finite[-1] if k not in ("finite",)]
    rec: dict[str, Any] = {"step": step, "epoch": round(step / steps_per_epoch, 4), "stage": seg.stage,
                           "level": seg.level, "mode": seg.mode}
    for k in keys:
        vals = [w[k] for w in finite if k in w]
        mean = float(np.mean(vals)) if vals else math.nan
        rec[k] = mean if math.isfinite(mean) else None  # JSON has no NaN; null marks a non-finite value
    rec["lr"], rec["wd"], rec["momentum"] = window[-1]["lr"], window[-1]["wd"], window[-1]["momentum"]
    step_time = sum(w["time_data"] + w["time_views"] + w["time_fwd_bwd"] + w["time_update"] for w in window)
    rec["img_per_s"] = gb * len(window) / step_time if step_time > 0 else None
    rec["nan_steps"] = nan_steps
    return rec


def summary_line(rec: dict[str, Any]) -> str:
    """One log line: the loss terms, lr, teacher entropy and throughput of a metrics record."""
    def fmt(v: Any, spec: str) -> str:
        return "nan" if v is None else format(v, spec)

    keys = ["loss"] + [k for k in rec if k.startswith("loss_")]
    parts = [f"{k.removeprefix('loss_')} {fmt(rec[k], '.4f')}" for k in keys]
    parts += [f"lr {fmt(rec['lr'], '.2e')}", f"entropy {fmt(rec.get('teacher_entropy'), '.3f')}",
              f"{fmt(rec.get('img_per_s'), '.1f')} img/s"]
    return " ".join(parts)
