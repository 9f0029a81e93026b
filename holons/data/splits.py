"""Patient-level train / val / test splits that never put one patient in two splits.

Each patient is placed by a keyed hash of its id (``seed`` is the key), not by a permutation
of the patients present. A patient's split therefore depends only on its own id, the seed
and the fractions: it stays the same when the archive grows or the cache is rebuilt, so a
test patient never drifts into training between runs. The price is that realised fractions
only approach the requested ones for many patients (a handful of patients may leave a split
empty). ``holons.data.cache.build_cache`` refuses a cache whose train split comes out empty while its
fraction is above 0 (with one patient that happens one time in five at 0.8 / 0.1 / 0.1) and names
``split_fractions=(1, 0, 0)`` (``--split-fractions 1 0 0``) as the way for so few patients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def patient_keys(patient_ids: Sequence[str | None], paths: Sequence[str]) -> list[str]:
    """The grouping key per image: its patient id, or its own path when the id is missing.

    Images without a patient id (PNG, JPEG, ... or DICOM without the tag) are treated as a
    patient of their own, so they cannot share a patient with anything else.
    """
    if len(patient_ids) != len(paths):
        raise ValueError(f"patient_ids ({len(patient_ids)}) and paths ({len(paths)}) differ in length")
    keys = []
    for pid, path in zip(patient_ids, paths, strict=True):
        missing = pid is None or (isinstance(pid, float) and np.isnan(pid)) or str(pid).strip() == ""
        keys.append(f"path:{path}" if missing else f"patient:{pid}")
    return keys


def _unit_interval(key: str, seed: int) -> float:
    """A uniform number in [0, 1) drawn from the SHA-256 of ``seed`` and ``key``."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def patient_splits(
    patient_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> np.ndarray:
    """Label each entry ``"train"``, ``"val"`` or ``"test"`` so that equal ids share one label.

    ``fractions`` are the target shares of patients (not images) per split and must sum to 1;
    a zero fraction leaves that split empty. Deterministic in (id, fractions, seed).
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    bounds = np.cumsum(fr)
    bounds[-1] = np.inf
    ids = np.asarray([str(p) for p in patient_ids], dtype=str)
    if ids.size == 0:
        return np.array([], dtype="<U5")
    unique, inverse = np.unique(ids, return_inverse=True)
    draws = np.array([_unit_interval(key, seed) for key in unique], dtype=np.float64)
    label_of_patient = np.searchsorted(bounds, draws, side="right")
    return np.asarray(SPLITS)[label_of_patient][inverse.reshape(-1)]
