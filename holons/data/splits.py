"""Train / val / test splits that never put one patient (or slide, or group) in two splits.

Every split in holons comes from this module. Two kinds, for two kinds of data:

**Archives (hash-based, stable as data arrive)**: ``patient_splits`` places each patient by a
keyed hash of its id (``seed`` is the key), not by a permutation of the patients present. A
patient's split therefore depends only on its own id, the seed and the fractions: it stays the
same when the archive grows or the cache is rebuilt, so a test patient never drifts into training
between runs. The price is that realised fractions only approach the requested ones for many
patients (a handful of patients may leave a split empty). ``holons.data.cache.build_cache`` refuses
a cache whose train split comes out empty while its fraction is above 0 (with one patient that
happens one time in five at 0.8 / 0.1 / 0.1) and names ``split_fractions=(1, 0, 0)``
(``--split-fractions 1 0 0``) as the way for so few patients. ``patient_keys`` gives the grouping
key of images without a patient id. Used by the cache, the datasets and the classification set.

**Labelled sets (seeded permutation, exact counts)**: the groups present are shuffled with a
seeded generator and dealt out by count, so the sizes are exact but a group's split depends on
the whole group list. ``group_split`` (test / val fractions of the groups, rounded up),
``group_kfold`` (round-robin folds) and ``assign_splits`` (either of the two, with validation
carved from the non-test folds) serve the karyotype data (slides as groups);
``index_split`` labels items numbered 0..n-1 (the synthetic phantoms' patients) with rounded
counts, each split non-empty once there are three items.

All functions are deterministic in their arguments; the seeds' salts (``0x5EED`` for groups,
``7919`` for numbered items) are part of the published splits and must not change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from holons.errors import HolonsError

SPLITS = ("train", "val", "test")
_GROUP_SALT = 0x5EED
_INDEX_SALT = 7919


class SplitError(HolonsError):
    """Too few groups for the requested split (the data, not a bug, is at fault)."""


# --------------------------------------------------------------------------- archives: keyed hash


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
    a zero fraction leaves that split empty. Deterministic in (id, fractions, seed). Raises
    ``ValueError`` for bad fractions.
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


# --------------------------------------------------------------------------- labelled sets: seeded deal


def _group_ranks(groups: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank, inverse): ``rank[u]`` is the place of the u-th sorted unique group in a shuffle seeded
    with ``seed``; ``inverse`` maps each row to its sorted unique group."""
    unique, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    permutation = np.random.default_rng([seed, _GROUP_SALT]).permutation(len(unique))
    rank = np.empty(len(unique), dtype=np.int64)
    rank[permutation] = np.arange(len(unique))
    return rank, inverse.reshape(-1)


def _deal(rank: np.ndarray, n_test: int, n_val: int) -> np.ndarray:
    """Labels by rank in a shuffle: the first ``n_test`` are test, the next ``n_val`` val, the rest train."""
    return np.where(rank < n_test, "test", np.where(rank < n_test + n_val, "val", "train")).astype("<U5")


def group_split(groups: Sequence[str], *, test_fraction: float = 0.2, val_fraction: float = 0.1,
                seed: int = 0) -> np.ndarray:
    """``"train"/"val"/"test"`` per row, whole groups (slides) at a time.

    The sorted unique groups are shuffled with ``seed``; the first ``ceil(test_fraction * G)``
    are test, the next ``ceil(val_fraction * G)`` validation. No group is in two splits, and the
    split of a fixed group list is fixed by the seed (documented test splits). Raises
    ``SplitError`` when test and val would leave no training group.
    """
    rank, inverse = _group_ranks(groups, seed)
    n = len(rank)
    n_test = math.ceil(test_fraction * n) if test_fraction > 0 else 0
    n_val = math.ceil(val_fraction * n) if val_fraction > 0 else 0
    if n and n_test + n_val >= n:
        raise SplitError(f"{n} groups are too few for test {test_fraction} and val {val_fraction}")
    return _deal(rank, n_test, n_val)[inverse]


def group_kfold(groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold 0..k-1 per row; groups are dealt round-robin after a seeded shuffle (sizes differ by <= 1).

    The shuffle is ``group_split``'s for the same seed. Raises ``SplitError`` unless 2 <= k <= groups.
    """
    rank, inverse = _group_ranks(groups, seed)
    if k < 2 or k > len(rank):
        raise SplitError(f"k-fold needs 2 <= k <= number of groups ({len(rank)}), got {k}")
    return (rank % k)[inverse]


def assign_splits(groups: Sequence[str], *, test_fraction: float, val_fraction: float, seed: int,
                  folds: int = 0, fold: int = 0) -> np.ndarray:
    """The fixed split (``folds == 0``, ``group_split``) or fold ``fold`` of a ``folds``-fold CV as
    test, with validation groups carved from the remaining groups (``val_fraction`` of all groups,
    at most half of the rest; their shuffle uses ``seed + 1``)."""
    if not folds:
        return group_split(groups, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    fold_ids = group_kfold(groups, folds, seed)
    groups = np.asarray([str(g) for g in groups])
    rest = groups[fold_ids != fold]
    inner_val = val_fraction / max(1e-9, 1.0 - 1.0 / folds)
    inner = group_split(rest, test_fraction=0.0, val_fraction=min(inner_val, 0.5), seed=seed + 1)
    out = np.full(len(groups), "test", dtype=object)
    out[fold_ids != fold] = inner
    return out.astype(str)


def index_split(n_items: int, *, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """``"train"/"val"/"test"`` for items numbered 0..n-1 (e.g. synthetic patients), by count.

    ``round(fraction * n)`` items (Python rounding, half to even) go to test and to val, at least
    one each once ``n >= 3``; which items is fixed by a permutation seeded with ``seed``.
    """
    n_val = int(round(n_items * val_fraction))
    n_test = int(round(n_items * test_fraction))
    if n_items >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    rank = np.empty(n_items, dtype=np.int64)
    rank[np.random.default_rng([seed, _INDEX_SALT]).permutation(n_items)] = np.arange(n_items)
    return _deal(rank, n_test, n_val)
