"""The one split module: exact outputs pinned (they define published splits), and its callers use it."""

from __future__ import annotations

import numpy as np
import pytest

from holons.data import splits
from holons.data.splits import (
    SplitError,
    assign_splits,
    group_kfold,
    group_split,
    index_split,
    patient_splits,
)
from holons.errors import HolonsError

GROUPS = [f"s{i % 10}" for i in range(20)]  # 10 slides, rows interleaved


def short(labels) -> str:
    return "".join({"train": ".", "val": "v", "test": "T"}[str(x)] for x in labels)


# The strings below were produced by the split functions before they were merged here
# (holons.finetune.karyotype.data, holons.data.synthetic.radiographs): they must never change.
def test_group_split_kfold_and_cv_outputs_are_pinned():
    assert short(group_split(GROUPS, test_fraction=0.2, val_fraction=0.1, seed=3)) == "T...v.T...T...v.T..."
    assert "".join(map(str, group_kfold(GROUPS, 3, seed=3))) == "12012002011201200201"
    cv = assign_splits(GROUPS, test_fraction=0.2, val_fraction=0.1, seed=3, folds=3, fold=1)
    assert short(cv) == "T..T...vvTT..T...vvT"


def test_index_split_outputs_are_pinned():
    assert short(index_split(20, test_fraction=0.15, val_fraction=0.15, seed=4)) == "........vvvT....T.T."
    assert short(index_split(3, test_fraction=0.15, val_fraction=0.15, seed=0)) == "T.v"  # none empty
    assert short(index_split(2, test_fraction=0.15, val_fraction=0.15, seed=0)) == ".."
    assert index_split(0, test_fraction=0.15, val_fraction=0.15, seed=0).size == 0


def test_patient_splits_output_is_pinned():
    assert short(patient_splits([f"p{i}" for i in range(20)], seed=2)) == "........v.T........."


def test_too_few_groups_is_a_user_error():
    with pytest.raises(SplitError, match="too few"):
        group_split(["a", "b"], test_fraction=0.5, val_fraction=0.5)
    with pytest.raises(SplitError, match="k-fold"):
        group_kfold(["a", "b"], 3)
    assert issubclass(SplitError, HolonsError)
    with pytest.raises(ValueError):
        patient_splits(["a"], fractions=(0.5, 0.5, 0.5))


def test_groups_are_never_split_and_rows_keep_their_order():
    split = group_split(GROUPS, test_fraction=0.3, val_fraction=0.2, seed=0)
    by_group = {}
    for g, s in zip(GROUPS, split, strict=True):
        by_group.setdefault(g, set()).add(str(s))
    assert all(len(v) == 1 for v in by_group.values())
    reversed_split = group_split(GROUPS[::-1], test_fraction=0.3, val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(reversed_split, split[::-1])  # a group's split ignores row order


def test_callers_use_this_module():
    from holons.data.synthetic import radiographs
    from holons.finetune.karyotype import data as karyotype_data

    assert karyotype_data.group_split is splits.group_split
    assert karyotype_data.group_kfold is splits.group_kfold
    assert karyotype_data.assign_splits is splits.assign_splits
    assert radiographs.index_split is splits.index_split
