"""Data streaming for pretraining: the training images, their batches step by step, and the views
of each step.

Determinism: data order is a function of (seed, epoch); the views of a step are drawn slice by slice
from generators seeded by (seed, step, slice), so any step can be reproduced from the seed alone
(which is what makes a resumed run continue bit-exactly on CPU).

Sharding: every rank reads its slice of each global batch (``RankBatchSampler``), so the cache is
sharded by global rank however the ranks are spread over nodes, and a run resumes under another world
size with the same global batches.

Archives that do not fit one disk (not built): the format to add is WebDataset-style tar shards
(POSIX tar files of ~1 GB holding the cached uint8 images as ``.npy`` members, read sequentially from
object storage or a parallel filesystem). Tar is a standard container every tool and storage system
streams; sequential reads of large objects are what object stores and network filesystems serve
fast, where the cache's random access into memory-mapped shards is not. The price is the exact
(seed, epoch) permutation: a streaming reader shuffles shard order and within a buffer instead, so
such a source would give up bit-exact resume and would shard by (rank, shard) rather than by
sample.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from holons.anatomy import ViewGenerator, Views
from holons.errors import ConfigError, HolonsError
from holons.ssl.config import PretrainConfig

__all__ = ["BatchStream", "ImageFolderDataset", "RankBatchSampler", "build_dataset", "concat_views",
           "derive_seed", "draw_views", "epoch_order", "stored_max_value"]


class ImageFolderDataset(Dataset):
    """Every readable image under a folder, decoded once, fitted to ``size x size`` (aspect kept,
    zero-padded, as the cache does) and held in memory as uint8. For small folders (tests, demos);
    large archives go through ``holons index`` + ``holons cache``. Unreadable files are counted
    in ``skipped`` and left out. ``as_stored=True`` yields the uint8 images (divide by ``max_value``
    on the device), as ``CachedImageDataset`` does."""

    max_value = np.float32(255.0)

    def __init__(self, root: str | Path, size: int, max_images: int | None = None,
                 as_stored: bool = False) -> None:
        from holons.data.formats import detect_format
        from holons.data.preprocess import Preprocessing

        root = Path(root)
        if not root.is_dir():
            raise HolonsError(f"data.images_dir {root} is not a folder")
        images, self.skipped = [], 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if max_images is not None and len(images) >= max_images:
                break
            if detect_format(path) is None:
                continue
            try:
                canvas, _ = Preprocessing(size=size).read(path)
            except HolonsError:
                self.skipped += 1
                continue
            images.append(np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8))
        if not images:
            raise HolonsError(f"data.images_dir {root} holds no readable images")
        self.images = np.stack(images)
        self.as_stored = as_stored

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.as_stored:
            return torch.from_numpy(self.images[index].copy()).unsqueeze(0)
        return torch.from_numpy(np.divide(self.images[index], self.max_value, dtype=np.float32)).unsqueeze(0)


def build_dataset(cfg: PretrainConfig) -> Dataset:
    """The training images of ``cfg.data``: a ``holons cache`` folder or a folder of image files."""
    d = cfg.data
    if d.cache_dir is not None:
        from holons.data.dataset import CachedImageDataset

        ds: Dataset = CachedImageDataset(d.cache_dir, split=d.split, as_stored=cfg.perf.uint8_transfer)
        if d.max_images is not None and d.max_images < len(ds):
            ds = torch.utils.data.Subset(ds, range(d.max_images))
        return ds
    size = d.image_size or cfg.views.global_size
    return ImageFolderDataset(d.images_dir, size, d.max_images, as_stored=cfg.perf.uint8_transfer)


def stored_max_value(dataset: Dataset) -> float:
    """What divides a stored image of ``dataset`` into [0, 1] (255 for uint8, 65535 for uint16)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return float(getattr(dataset, "max_value", 255.0))


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (seed, step, slice, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


class RankBatchSampler(torch.utils.data.Sampler):
    """The local batches of one epoch for one global rank, from a starting step.

    ``order`` is the epoch's permutation of the dataset (a function of (seed, epoch)); global batch
    ``b`` is ``order[b * global_batch:(b + 1) * global_batch]`` and rank ``r`` of ``world`` takes its
    ``r``-th contiguous slice of ``global_batch / world`` indices. The ranks' slices of a step are
    disjoint and together make the global batch, whichever way the ranks are spread over nodes
    (the global rank is all that counts). Drop-last: the ``len(order) % global_batch`` samples at the
    end of the permutation are left out of that epoch, so every step sees a full batch; the
    permutation changes each epoch, so a different remainder is left out each time. Within an epoch
    no sample is seen twice on any rank or across ranks. The same (order, global batch) gives the
    same global batches for any world size that divides the global batch, which is what lets a run
    resume under another world size.
    """

    def __init__(self, order: np.ndarray, start: int, global_batch: int, rank: int, world: int) -> None:
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} must be divisible by the {world} ranks")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.order, self.start, self.gb = order, start, global_batch
        self.local = global_batch // world
        self.offset = rank * self.local
        self.n = len(order) // global_batch

    def __len__(self) -> int:
        return max(0, self.n - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.n):
            lo = b * self.gb + self.offset
            yield self.order[lo:lo + self.local].tolist()


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` samples in an epoch: a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0xDA7A))
    return torch.randperm(n, generator=g).numpy()


class BatchStream:
    """Endless local batches, step by step, reproducible from (seed, step) alone.

    ``prefetch`` > 0: a background thread reads that many batches ahead (and pins them when
    ``pin_memory``), so reading the cache overlaps the step; the batches are the same either way.
    """

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, rank: int, world: int,
                 num_workers: int, start_step: int, pin_memory: bool, prefetch: int = 0) -> None:
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} must be divisible by the {world} ranks")
        if len(dataset) < global_batch:
            raise ConfigError(f"data.batch_size={global_batch} exceeds the {len(dataset)} training images")
        self.dataset, self.gb, self.seed = dataset, global_batch, seed
        self.rank, self.world, self.workers, self.pin = rank, world, num_workers, pin_memory
        self.steps_per_epoch = len(dataset) // global_batch
        self.step = start_step
        self.prefetch = prefetch
        self._it: Iterator | None = None
        self._queue: queue.Queue | None = None
        self._closed = threading.Event()

    def _epoch_loader(self) -> Iterator:
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        sampler = RankBatchSampler(epoch_order(len(self.dataset), self.seed, epoch), pos, self.gb, self.rank,
                                   self.world)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                               pin_memory=self.pin and not self.prefetch, persistent_workers=False))

    def _read(self) -> torch.Tensor:
        if self._it is None or self.step % self.steps_per_epoch == 0:
            self._it = self._epoch_loader()
        batch = next(self._it)
        self.step += 1
        return batch["image"] if isinstance(batch, dict) else batch

    def next(self) -> torch.Tensor:
        if not self.prefetch:
            return self._read()
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            threading.Thread(target=_read_ahead, args=(weakref.ref(self), self._queue, self._closed),
                             name="holons-prefetch", daemon=True).start()
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """Stop the read-ahead thread (if any)."""
        self._closed.set()


def _read_ahead(ref: weakref.ref, out: queue.Queue, closed: threading.Event) -> None:
    """The read-ahead thread of a ``BatchStream``: batches (or the exception that stopped reading) into
    ``out``; it ends when the stream is closed or garbage-collected (it holds no reference while
    it waits)."""
    while not closed.is_set():
        stream = ref()
        if stream is None:
            return
        try:
            item: Any = stream._read()
            if stream.pin:
                item = item.pin_memory()
        except Exception as e:  # handed to the training thread, which raises it
            item = e
        del stream
        while True:
            if closed.is_set() or ref() is None:
                return
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, Exception):
            return


def concat_views(groups: list[Views]) -> Views:
    """One ``Views`` from views of consecutive batch slices (partner indices shifted by slice)."""
    if len(groups) == 1:
        return groups[0]
    offsets, n = [], 0
    for v in groups:
        offsets.append(n)
        n += v.batch_size

    def cat(name: str) -> torch.Tensor | None:
        items = [getattr(v, name) for v in groups]
        if any(i is None for i in items):
            return None
        if name == "partner":
            items = [p + o for p, o in zip(items, offsets, strict=True)]
        return torch.cat(items)

    first = groups[0]
    kwargs = {f: cat(f) for f in ("whole", "whole_box", "global_crops", "global_boxes", "local_crops",
                                   "local_boxes", "parts", "part_boxes", "global_angles", "local_angles",
                                   "partner", "global_lambda", "local_lambda", "part_swap")}
    return Views(mode=first.mode, level=first.level, k=first.k, local_part_index=first.local_part_index,
                 **kwargs)


def draw_views(generator: ViewGenerator, images: torch.Tensor, *, level: int, mode: str, seed: int, step: int,
               first_slice: int, slices: int, device: torch.device) -> Views:
    """The views of a local batch, drawn in ``slices`` equal slices (numbered from ``first_slice``
    across ranks), each from its own generator seeded by (seed, step, slice)."""
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    out = []
    for i, chunk in enumerate(images.chunk(slices)):
        g = torch.Generator(device=gen_device).manual_seed(derive_seed(seed, step, first_slice + i, 0x71E5))
        out.append(generator(chunk, level=level, generator=g, mode=mode))
    return concat_views(out)
