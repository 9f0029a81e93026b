"""Random-access ``Dataset`` over a decode-once cache (see ``holons.data.cache``).

Shards are memory-mapped lazily, in the process that reads them: a DataLoader worker opens its
own maps on first use (nothing open is pickled to it), and at most ``max_open_shards`` stay
open per process so that millions of images never exhaust file descriptors.

Distributed training: each rank reads its own subset with the stock sampler,
``DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=world, rank=rank))``, or with
``ds.shard_for_rank(rank, world)`` (a strided ``Subset``, disjoint across ranks, no padding).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from holons.data.cache import MAX_VALUE, CacheError
from holons.data.splits import SPLITS, patient_keys, patient_splits


class CachedImageDataset(Dataset):
    """Images of a cache as float32 tensors ``1 x S x S`` in [0, 1], optionally one split only.

    ``split``: ``"train" | "val" | "test"`` or None for all images. By default the split stored
    at cache time is used; pass ``fractions`` (and ``seed``) to recompute patient-level splits
    with other fractions. ``transform`` is applied to the image tensor. With ``return_meta``
    an item is a dict with ``image``, ``index`` (position in this dataset), ``patient_id``
    (pseudonymized; "" when the image has none, so batches collate) and ``path`` (manifest path).
    ``as_stored=True`` yields the stored integers instead (uint8 / uint16 tensors, divide by
    ``max_value`` on the device): 4x (2x) fewer bytes between DataLoader workers and to the GPU.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        split: str | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        return_meta: bool = False,
        *,
        fractions: Sequence[float] | None = None,
        seed: int = 0,
        max_open_shards: int = 128,
        as_stored: bool = False,
    ):
        import pandas as pd

        self.cache_dir = Path(cache_dir)
        config_file, index_file = self.cache_dir / "cache.json", self.cache_dir / "index.parquet"
        if not config_file.is_file() or not index_file.is_file():
            raise CacheError(f"{self.cache_dir} is not a finished holons cache (run `holons cache` first)")
        self.config = json.loads(config_file.read_text())
        if split is not None and split not in SPLITS:
            raise CacheError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
        table = pd.read_parquet(index_file)
        if fractions is not None:
            keys = patient_keys(table["patient_id"].tolist(), table["path"].tolist())
            table["split"] = patient_splits(keys, fractions, seed)
        if split is not None:
            table = table[table["split"] == split]
        self.table = table.reset_index(drop=True)
        self.split, self.transform = split, transform
        self.return_meta, self.as_stored = return_meta, as_stored
        self.size = int(self.config["size"])
        self.max_value = np.float32(MAX_VALUE[self.config["dtype"]])
        self.max_open_shards = max(1, int(max_open_shards))
        self._shard = self.table["shard"].to_numpy(np.int64)
        self._position = self.table["position"].to_numpy(np.int64)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def _shard_array(self, shard: int) -> np.ndarray:
        if self._pid != os.getpid():  # forked worker: never share the parent's maps
            self._maps, self._pid = OrderedDict(), os.getpid()
        array = self._maps.get(shard)
        if array is None:
            array = np.load(self.cache_dir / "shards" / f"shard-{shard:05d}.npy", mmap_mode="r")
            self._maps[shard] = array
            if len(self._maps) > self.max_open_shards:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return array

    def raw(self, index: int) -> np.ndarray:
        """The stored integer image ``S x S`` (a copy), without scaling or transform."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return np.array(self._shard_array(int(self._shard[index]))[self._position[index]])

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self)
        # numpy does the scaling: a per-item torch op costs ~10x more (thread-pool dispatch)
        stored = self._shard_array(int(self._shard[index]))[self._position[index]]
        if self.as_stored:
            image = torch.from_numpy(np.array(stored)).unsqueeze(0)
        else:
            image = torch.from_numpy(np.divide(stored, self.max_value, dtype=np.float32)).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        if not self.return_meta:
            return image
        pid = self.table.at[index, "patient_id"]
        return {"image": image, "index": index, "patient_id": pid if isinstance(pid, str) else "",
                "path": self.table.at[index, "path"]}

    def shard_for_rank(self, rank: int, world_size: int) -> Subset:
        """The images of one DDP rank: indices ``rank, rank + world, ...`` (disjoint, covering all)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return Subset(self, range(rank, len(self), world_size))
