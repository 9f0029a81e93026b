"""Labelled image sets for classification: a manifest CSV, the built-in phantoms, or the covid set.

- a manifest CSV: a ``path`` column (relative paths are relative to the CSV's folder) and either
  one ``label`` column (single-label: the classes are its distinct values) or several 0/1 columns,
  one per finding (multi-label: each finding is a binary task); optional ``split`` (train / val /
  test) and ``patient`` columns;
- phantoms (``image_table.csv`` with ``cardiomegaly`` and ``nodule``): two binary findings
  (multi-label); train = split ``train``, test = ``test`` (else ``val``);
- the covid set (``metadata.csv`` with ``finding`` and ``patientid``): frontal views only, one
  single-label task ``covid19`` (COVID-19 in ``finding`` vs any other finding); train / test split
  by patient (keyed hash of the patient id, seeded; ``holons.data.splits``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from holons.data.annotated import load_annotated
from holons.data.splits import patient_splits
from holons.errors import HolonsError

__all__ = ["PHANTOM_FINDINGS", "ClassificationSet", "load_classification_set", "load_label_manifest",
           "label_subset"]

PHANTOM_FINDINGS = ("cardiomegaly", "nodule")
ABSENT_PRESENT = ["absent", "present"]
_RESERVED = ("path", "split", "patient", "id")


@dataclass
class ClassificationSet:
    """Images with labels: ``labels`` is ``N x T`` class indices (one column per task). A multi-label set
    has one binary task per finding (classes ``absent`` / ``present``); a single-label set one task."""

    name: str
    paths: list[Path]
    labels: np.ndarray
    tasks: list[str]
    class_names: list[list[str]]
    split: np.ndarray  # "train" | "val" | "test" | "all" per image
    single_label: bool

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_label_manifest(path: str | Path) -> ClassificationSet:
    """A manifest CSV: ``path,label`` (single-label) or ``path,<finding>,...`` 0/1 columns (multi-label)."""
    path = Path(path)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "path" not in table.columns:
        raise HolonsError(f"{path}: a label manifest needs a 'path' column")
    if table.empty:
        raise HolonsError(f"{path} lists no images")
    paths = [p if p.is_absolute() else path.parent / p for p in map(Path, table["path"])]
    split = (table["split"].to_numpy(dtype=object) if "split" in table.columns
             else np.full(len(table), "all", dtype=object))
    if "label" in table.columns:
        classes = sorted(table["label"].unique().tolist())
        if "" in classes:
            raise HolonsError(f"{path}: {int((table['label'] == '').sum())} row(s) have an empty label")
        labels = np.array([classes.index(v) for v in table["label"]])[:, None]
        return ClassificationSet(name=path.stem, paths=paths, labels=labels, tasks=["label"],
                                 class_names=[classes], split=split, single_label=True)
    tasks = [c for c in table.columns if c not in _RESERVED]
    if not tasks:
        raise HolonsError(f"{path}: no label column ('label', or one 0/1 column per finding)")
    bad = [t for t in tasks if not set(table[t]) <= {"0", "1"}]
    if bad:
        raise HolonsError(f"{path}: multi-label columns must hold 0 or 1; {bad[0]!r} holds "
                          f"{sorted(set(table[bad[0]]) - {'0', '1'})[:3]}")
    labels = np.stack([table[t].astype(int).to_numpy() for t in tasks], axis=1)
    return ClassificationSet(name=path.stem, paths=paths, labels=labels, tasks=tasks,
                             class_names=[ABSENT_PRESENT] * len(tasks), split=split, single_label=False)


def load_classification_set(
    root: str | Path, *, seed: int = 0, test_fraction: float = 0.3
) -> ClassificationSet:
    """Open a manifest CSV, a phantom set or the covid set at ``root`` (see the module docstring)."""
    root = Path(root)
    if root.is_file():
        return load_label_manifest(root)
    table = root / "image_table.csv"
    if table.is_file() and set(PHANTOM_FINDINGS) <= set(pd.read_csv(table, nrows=0).columns):
        data = load_annotated(root)
        test = data.default_eval_split()
        t = data.table[data.table["split"].isin(["train", test])]
        labels = np.stack([t[f].astype(int).to_numpy() for f in PHANTOM_FINDINGS], axis=1)
        return ClassificationSet(
            name="phantoms", paths=[data.image_path(i) for i in t["id"]], labels=labels,
            tasks=list(PHANTOM_FINDINGS), class_names=[ABSENT_PRESENT] * len(PHANTOM_FINDINGS),
            split=np.where(t["split"].to_numpy() == "train", "train", "test"), single_label=False,
        )
    meta = root / "metadata.csv"
    if meta.is_file():
        m = pd.read_csv(meta, dtype=str, keep_default_na=False)
        missing = {"finding", "patientid", "filename"} - set(m.columns)
        if missing:
            raise HolonsError(f"{meta} lacks columns {sorted(missing)}")
        if "view" in m.columns:
            m = m[m["view"].str.upper() != "L"]  # frontal views only
        folder = root / "images"
        m = m[[(folder / f).is_file() for f in m["filename"]]]
        if m.empty:
            raise HolonsError(f"no images of {meta} found under {folder}")
        covid = m["finding"].str.contains("COVID-19", regex=False).astype(int).to_numpy()
        split = patient_splits(m["patientid"].tolist(), (1 - test_fraction, 0.0, test_fraction), seed=seed)
        return ClassificationSet(
            name="covid", paths=[folder / f for f in m["filename"]], labels=covid[:, None], tasks=["covid19"],
            class_names=[["other", "COVID-19"]], split=np.where(split == "train", "train", "test"),
            single_label=True,
        )
    raise HolonsError(f"{root} is neither a label manifest CSV (path + label or 0/1 columns), a phantom set "
                      "(image_table.csv with cardiomegaly, nodule) nor a finding-labelled set "
                      "(metadata.csv with finding, patientid, filename)")


def label_subset(labels: np.ndarray, fraction: float | None, seed: int, *,
                 count: int | None = None) -> np.ndarray:
    """Indices of a ``fraction`` (or exactly ``count``) of the rows of ``labels`` (``N x T``), seeded, topped
    up so that every class present in every task has at least one example."""
    n = len(labels)
    if count is not None:
        if not 1 <= count <= n:
            raise HolonsError(f"{count} labelled images asked for, but the training split holds {n}")
        size = count
    else:
        if fraction is None or not 0.0 < fraction <= 1.0:
            raise HolonsError(f"label fraction must be within (0, 1], got {fraction}")
        size = max(1, math.ceil(fraction * n))
    order = np.random.default_rng(seed).permutation(n)
    take = list(order[:size])
    for t in range(labels.shape[1]):
        for c in np.unique(labels[:, t]):
            if not np.any(labels[take, t] == c):
                take.append(next(i for i in order if labels[i, t] == c))
    return np.sort(np.asarray(take))
