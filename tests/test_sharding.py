"""The pretraining cache sharded by global rank: every step's rank slices are disjoint and make the
global batch; within an epoch no sample is seen twice; the stream resumes at any step, under any
world size that divides the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from holons.errors import ConfigError
from holons.ssl.stream import BatchStream, RankBatchSampler, epoch_order


class SampleIds(Dataset):
    """Item ``i`` is the tensor ``i``: a batch shows which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def _rank_batches(n: int, gb: int, world: int, steps: int, start: int = 0) -> list[list[list[int]]]:
    """``steps`` steps from ``start``: per step, each rank's local batch of sample ids."""
    streams = [BatchStream(SampleIds(n), gb, seed=3, rank=r, world=world, num_workers=0, start_step=start,
                           pin_memory=False) for r in range(world)]
    return [[s.next().tolist() for s in streams] for _ in range(steps)]


# (samples, global batch, world sizes): even and uneven splits, several nodes x processes
CASES = [(48, 12, (1, 2, 3, 4, 6, 12)), (50, 12, (1, 2, 4)), (37, 6, (1, 2, 3, 6)), (7, 7, (1, 7))]


@pytest.mark.parametrize(("n", "gb", "worlds"), CASES)
def test_every_sample_once_per_epoch_none_twice(n, gb, worlds):
    steps_per_epoch, epochs = n // gb, 3
    reference = _rank_batches(n, gb, 1, steps_per_epoch * epochs)
    for world in worlds:
        run = _rank_batches(n, gb, world, steps_per_epoch * epochs)
        for step, (ranks, ref) in enumerate(zip(run, reference, strict=True)):
            assert all(len(r) == gb // world for r in ranks)
            # the rank slices, in rank order, are exactly the one-process global batch of this step
            assert sum(ranks, []) == ref[0], (world, step)
        for e in range(epochs):
            epoch = run[e * steps_per_epoch:(e + 1) * steps_per_epoch]
            seen = [i for ranks in epoch for r in ranks for i in r]
            assert len(seen) == len(set(seen)) == steps_per_epoch * gb  # none twice, across ranks
            left_out = set(range(n)) - set(seen)
            assert len(left_out) == n % gb  # drop-last: only the remainder of the permutation
            assert left_out == set(epoch_order(n, 3, e)[steps_per_epoch * gb:].tolist())


def test_left_out_remainder_changes_between_epochs_and_is_covered_over_epochs():
    n, gb = 50, 12
    run = _rank_batches(n, gb, 2, 4 * 12)
    seen_per_epoch = [{i for ranks in run[e * 4:(e + 1) * 4] for r in ranks for i in r} for e in range(12)]
    left_out = [frozenset(set(range(n)) - s) for s in seen_per_epoch]
    assert len(set(left_out)) > 1
    assert set().union(*seen_per_epoch) == set(range(n))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_stream_resumes_mid_epoch_under_another_world_size(world):
    n, gb = 50, 8
    uninterrupted = _rank_batches(n, gb, 2, 15)
    resumed = _rank_batches(n, gb, world, 8, start=7)  # step 7 is mid-epoch (6 steps per epoch)
    for a, b in zip(uninterrupted[7:], resumed, strict=True):
        assert sum(a, []) == sum(b, [])


def test_sampler_rejects_a_world_that_does_not_divide_the_batch():
    with pytest.raises(ConfigError, match="divisible"):
        RankBatchSampler(np.arange(10), 0, 6, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        RankBatchSampler(np.arange(10), 0, 6, 3, 3)
