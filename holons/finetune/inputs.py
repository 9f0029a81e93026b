"""Which images a fine-tuning run trains and validates on, and reading them through the preprocessing
contract (``holons.data.preprocess``); unreadable files are reported and skipped."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from holons.data.image import describe_error
from holons.data.preprocess import Geometry, Preprocessing
from holons.errors import HolonsError

__all__ = ["READ_ERRORS", "read_canvases", "train_val_indices", "take_subset"]

READ_ERRORS = (HolonsError, OSError, ValueError)
"""What a bad input file raises on reading (an unreadable image, a missing mask...)."""


def read_canvases(paths: Sequence[Path], preprocessing: Preprocessing, *, show: bool = False,
                  report: Callable[[str], None] | None = None, desc: str = "read images",
                  ) -> tuple[np.ndarray, list[Geometry | None]]:
    """Every image on its ``size x size`` canvas (``N x S x S`` float32) and its geometry; an unreadable
    file gets a zero canvas and geometry None, and one line through ``report``."""
    size = preprocessing.size
    canvases = np.zeros((len(paths), size, size), dtype=np.float32)
    geometries: list[Geometry | None] = []
    for i, path in enumerate(tqdm(paths, desc=desc, disable=not show)):
        try:
            canvases[i], geometry = preprocessing.read(path)
        except READ_ERRORS as e:
            geometry = None
            if report is not None:
                report(f"skipped {path}: {describe_error(e)}")
        geometries.append(geometry)
    return canvases, geometries


def train_val_indices(split: np.ndarray, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: the data's own ``train`` and ``val`` (else ``test``) rows when it
    has them, else a seeded ``val_fraction`` of all rows held out."""
    split = np.asarray(split, dtype=object)
    train = np.flatnonzero(split == "train")
    held = next((np.flatnonzero(split == s) for s in ("val", "test") if np.any(split == s)), None)
    if len(train) and held is not None:
        return train, held
    n = len(split)
    order = np.random.default_rng([seed, n]).permutation(n)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def take_subset(n: int, *, fraction: float, shots: int | None, seed: int) -> np.ndarray:
    """Positions of the labelled training images: exactly ``shots`` of ``n`` (few-shot), else a
    ``fraction`` (at least one), seeded."""
    count = shots if shots is not None else max(1, math.ceil(fraction * n))
    if count > n:
        raise HolonsError(f"{count} labelled images asked for, but the training split holds {n}")
    return np.sort(np.random.default_rng([seed, count]).choice(n, size=count, replace=False))


def log_and_print(logger: logging.Logger) -> Callable[[str], None]:
    """A reporter that writes a line to the run's log and to the terminal (above any progress bar)."""
    def report(line: str) -> None:
        logger.info(line)
        tqdm.write(line)
    return report
