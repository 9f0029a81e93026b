"""Decode-once cache: every ``ok`` image of a manifest decoded once, resized and stored in shards.

Decoding a 12-bit DICOM costs far more than training on it; the cache pays that cost once.
Each image is read with ``holons.data.readers.read_image`` (VOI policy ``voi``), prepared by the
radiograph preprocessing contract (``holons.data.preprocess.Preprocessing``, ``resize="letterbox"``:
aspect ratio kept, longer side ``size``, centred on a zero ``size x size`` canvas), and stored as
uint8 or uint16.

Layout of a cache folder::

    CACHE/
      cache.json              settings (size, dtype, voi, split fractions/seed), counts, format version
      index.parquet           one row per cached image (see INDEX_COLUMNS), rewritten last, atomically
      skipped.parquet         path + reason of every image that could not be decoded
      shards/shard-00000.npy  uint8/uint16 array N x size x size, np.load(..., mmap_mode="r")
      shards/shard-00000.parquet  what went into that shard (the shard's commit record)

Index columns: ``path`` (manifest path, relative to the archive root), ``shard`` and ``position``
(row ``position`` of ``shards/shard-{shard:05d}.npy``), ``orig_h, orig_w`` (decoded shape),
``scale_y, scale_x`` (content pixels per source pixel), ``pad_top, pad_left, content_h,
content_w`` (where the image sits on the canvas), ``spacing_row, spacing_col`` (source pixel
spacing in mm, NaN when unknown), ``patient_id, study_id, series_id, modality, body_part,
view_position, format, size, mtime`` (from the manifest) and ``split`` (train / val / test, by
patient, see ``holons.data.splits``). ``Geometry.from_row(row).to_source`` maps cache coordinates back.

Reliability: every shard and its record are written to a temporary file and renamed; a shard
counts only once its record exists. A rerun (after a kill, or with a grown manifest) keeps every
finished shard and decodes only manifest rows that are new or whose size / mtime changed; the
slots of replaced images stay in their old shards as dead space (``dead_slots`` in cache.json).
An image that fails to decode is recorded with its reason and never stops the job, including a
decoder that crashes its worker process. Do not run two builds into one folder at once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from holons.data.preprocess import Geometry, Preprocessing
from holons.data.workers import usable_cpus
from holons.errors import HolonsError
from holons.files import atomic_path, atomic_write

CACHE_VERSION = 1
MAX_VALUE = {"uint8": 255, "uint16": 65535}
GEOMETRY_COLUMNS = tuple(f.name for f in fields(Geometry))
MANIFEST_META_COLUMNS = (
    "patient_id", "study_id", "series_id", "modality", "body_part", "view_position", "format",
)
INDEX_COLUMNS = (
    "path", "shard", "position", *GEOMETRY_COLUMNS, "spacing_row", "spacing_col",
    *MANIFEST_META_COLUMNS, "size", "mtime", "split",
)
_RECORD_COLUMNS = (
    "path", "size", "mtime", "status", "reason", "shard", "position", *GEOMETRY_COLUMNS,
    "spacing_row", "spacing_col",
)


class CacheError(HolonsError):
    """The cache folder, its settings or its manifest cannot be used."""


# --------------------------------------------------------------------------- storage
def quantize(canvas: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] floats to the stored integer type (round to nearest)."""
    return np.rint(np.clip(canvas, 0.0, 1.0) * MAX_VALUE[dtype]).astype(dtype)


# --------------------------------------------------------------------------- decoding (worker side)
def _spacing(meta: dict) -> tuple[float, float]:
    spacing = meta.get("pixel_spacing_mm") if isinstance(meta, dict) else None
    try:
        row, col = (float(v) for v in spacing)
        return row, col
    except (TypeError, ValueError):
        return math.nan, math.nan


def decode_for_cache(path: str, size: int, dtype: str, voi: str) -> dict[str, Any]:
    """Decode, fit and quantize one image; never raises for a bad image (status ``skipped``)."""
    from holons.data.image import UnreadableImage
    from holons.data.readers import read_image

    try:
        image = read_image(path, voi=voi)
        pixels = np.asarray(image.pixels, dtype=np.float32)
        if pixels.ndim != 2 or min(pixels.shape) < 1:
            return {"status": "skipped", "reason": f"decoded pixels have shape {pixels.shape}, not H x W"}
        if not np.isfinite(pixels).all():
            return {"status": "skipped", "reason": "decoded pixels are not finite"}
        canvas, geometry = Preprocessing(size=size, resize="letterbox", voi=voi).apply(pixels)
        spacing_row, spacing_col = _spacing(image.meta)
        return {"status": "cached", "reason": "", "pixels": quantize(canvas, dtype), **geometry.as_dict(),
                "spacing_row": spacing_row, "spacing_col": spacing_col}
    except UnreadableImage as e:
        return {"status": "skipped", "reason": str(getattr(e, "reason", "") or e)}
    except MemoryError:
        return {"status": "skipped", "reason": "out of memory while decoding"}
    except Exception as e:  # a decoder bug must not stop a long job: record it and move on
        return {"status": "skipped", "reason": f"decoder error ({type(e).__name__})"}


def _decode_task(task: tuple[str, int, str, str]) -> dict[str, Any]:
    return decode_for_cache(*task)


# --------------------------------------------------------------------------- manifest and state
def _load_manifest(manifest: str | os.PathLike, archive_root: str | os.PathLike | None):
    from holons.data.manifest import read_manifest

    path = Path(manifest)
    if path.is_dir():
        raise CacheError(f"expected a manifest file (from `holons index`), got a folder: {path}; "
                         f"index it first: holons index {path} --out manifest.parquet")
    if not path.is_file():
        raise CacheError(f"manifest not found: {path}")
    try:
        df = read_manifest(path)
    except HolonsError:
        raise
    except Exception as e:
        raise CacheError(f"{path} is not a readable holons manifest ({type(e).__name__})") from e
    missing = [c for c in ("path", "size", "mtime", "status") if c not in df.columns]
    if missing:
        raise CacheError(f"{path} is not a holons manifest (missing columns: {', '.join(missing)})")
    root = archive_root if archive_root is not None else df.attrs.get("archive_root")
    if not root:
        raise CacheError(f"{path} does not record its archive root; pass archive_root")
    for col in MANIFEST_META_COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df, Path(os.fsdecode(root))


def _no_ok_rows(df) -> str:
    """Why a manifest has no ``ok`` row, in words: its size and its most common reasons."""
    if not len(df):
        return "it lists no files (was the indexed folder empty?)"
    reasons = df["reason"].fillna("").replace("", "no reason").value_counts()
    top = ", ".join(f"{reason}: {n}" for reason, n in reasons.head(3).items())
    more = f", {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
    return f"none of its {len(df)} rows is ok ({top}{more})"


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder that holds something else, or a cache built with other settings."""
    config = out / "cache.json"
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out} is a file, not a cache folder")
    if config.is_file():
        try:
            existing = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"{config} is unreadable ({type(e).__name__}); use a new --out folder") from e
        for key in ("size", "dtype", "voi"):
            if existing.get(key) != settings[key]:
                raise CacheError(
                    f"{out} was built with {key}={existing.get(key)!r}, not {settings[key]!r}; "
                    "use another --out folder or delete this one")
    elif out.exists() and any(p.name != "shards" for p in out.iterdir()):
        raise CacheError(f"{out} is not empty and is not a holons cache; choose another --out folder")


def _shard_path(out: Path, shard: int, suffix: str) -> Path:
    return out / "shards" / f"shard-{shard:05d}{suffix}"


def _finished_records(out: Path):
    """Records of every committed shard (record file present, array present with matching length)."""
    import pandas as pd

    shards_dir = out / "shards"
    frames = []
    for record_file in sorted(shards_dir.glob("shard-*.parquet")):
        npy = record_file.with_suffix(".npy")
        try:
            records = pd.read_parquet(record_file)
            n_cached = int((records["status"] == "cached").sum())
            if not npy.is_file() or np.load(npy, mmap_mode="r").shape[0] != n_cached:
                continue
        except Exception:  # a damaged record only costs a re-decode of its images
            continue
        frames.append(records)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in _RECORD_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _current_records(records, ok):
    """The latest record of each manifest path whose size and mtime still match the manifest."""
    if records.empty:
        return records
    latest = records.sort_values("shard", kind="stable").drop_duplicates("path", keep="last")
    same = latest.merge(ok[["path", "size", "mtime"]], on="path", how="inner", suffixes=("", "_now"))
    unchanged = (same["size"] == same["size_now"]) & (same["mtime"] == same["mtime_now"])
    return same.loc[unchanged, list(_RECORD_COLUMNS)]


def _remove_stale_temporaries(out: Path) -> None:
    for tmp in (out / "shards").glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)


def _write_parquet(df, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _write_shard(out: Path, shard: int, rows, results: list[dict[str, Any]], size: int, dtype: str) -> None:
    """Write the array, then its record (the commit), each atomically."""
    import pandas as pd

    cached = [r for r in results if r["status"] == "cached"]
    array = (np.stack([r["pixels"] for r in cached]) if cached else np.zeros((0, size, size), dtype=dtype))
    with atomic_write(_shard_path(out, shard, ".npy")) as f:
        np.save(f, array)
    records, position = [], 0
    for (path, file_size, mtime), r in zip(rows, results, strict=True):
        rec = {"path": path, "size": file_size, "mtime": mtime, "status": r["status"], "reason": r["reason"],
               "shard": shard, "position": -1}
        rec.update({k: r.get(k, math.nan) for k in (*GEOMETRY_COLUMNS, "spacing_row", "spacing_col")})
        if r["status"] == "cached":
            rec["position"] = position
            position += 1
        records.append(rec)
    _write_parquet(pd.DataFrame.from_records(records, columns=list(_RECORD_COLUMNS)),
                   _shard_path(out, shard, ".parquet"))


# --------------------------------------------------------------------------- the job
class _Decoder:
    """Decodes batches in a process pool (or in-process for one worker), surviving worker crashes."""

    max_consecutive_crashes = 3

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.crashes_in_a_row = 0

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def decode(self, tasks: list[tuple[str, int, str, str]]) -> list[dict[str, Any]]:
        if self.workers <= 1:
            return [_decode_task(t) for t in tasks]
        if self.pool is None:
            self.pool = self._new_pool(self.workers)
        try:
            chunk = max(1, len(tasks) // (self.workers * 4))
            return list(self.pool.map(_decode_task, tasks, chunksize=chunk))
        except BrokenProcessPool:
            self.close()
            return [self._decode_isolated(t) for t in tasks]

    def _decode_isolated(self, task: tuple[str, int, str, str]) -> dict[str, Any]:
        """One task in its own pool, so a crashing decoder only loses its own image."""
        if self.pool is None:
            self.pool = self._new_pool(1)
        try:
            result = self.pool.submit(_decode_task, task).result()
            self.crashes_in_a_row = 0
            return result
        except BrokenProcessPool:
            self.close()
            self.crashes_in_a_row += 1
            if self.crashes_in_a_row >= self.max_consecutive_crashes:
                raise CacheError(
                    "decoder worker processes keep dying (out of memory, or they cannot start); "
                    "finished shards are kept: rerun, or use --workers 1") from None
            return {"status": "skipped", "reason": "decoder crashed its worker process"}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _progress_bar(total: int, progress: bool | None):
    import sys

    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, unit="img", desc="cache", disable=not enabled, dynamic_ncols=True)


def build_cache(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int,
    dtype: Literal["uint8", "uint16"] = "uint8",
    voi: str = "window",
    shard_size: int = 1024,
    workers: int | None = None,
    progress: bool | None = None,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    archive_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Decode every ``ok`` row of ``manifest`` once into ``out`` (see the module docstring).

    Resumable: rerunning with the same ``size``/``dtype``/``voi`` decodes only what is missing or
    changed. ``archive_root`` overrides the root recorded in the manifest (a moved archive).
    Returns a summary dict (see ``format_cache_summary``). A manifest without a usable image (no
    ``ok`` row, or none that decodes) and an empty train split while ``split_fractions[0] > 0`` (a
    handful of patients, see ``holons.data.splits``) raise ``CacheError`` before the index is written.
    """
    from holons.data.splits import patient_keys, patient_splits

    started = time.monotonic()
    if dtype not in MAX_VALUE:
        raise CacheError(f"dtype must be uint8 or uint16, got {dtype!r}")
    if size < 8:
        raise CacheError(f"size must be at least 8 pixels, got {size}")
    if shard_size < 1:
        raise CacheError(f"shard_size must be positive, got {shard_size}")
    out = Path(out)
    settings = {"version": CACHE_VERSION, "size": int(size), "dtype": dtype, "voi": voi,
                "split_fractions": [float(f) for f in split_fractions], "split_seed": int(split_seed)}
    patient_splits(["probe"], split_fractions, split_seed)  # validates fractions before any work
    df, root = _load_manifest(manifest, archive_root)
    if not (df["status"] == "ok").any():
        raise CacheError(f"no usable image in {manifest}: {_no_ok_rows(df)}; nothing to cache")
    _check_settings(out, settings)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    if not (out / "cache.json").is_file():
        with atomic_write(out / "cache.json", "w") as f:
            json.dump({**settings, "complete": False}, f, indent=2)

    ok = df[df["status"] == "ok"].drop_duplicates("path", keep="last")
    records = _finished_records(out)
    done_paths = set(_current_records(records, ok)["path"])
    todo = ok[~ok["path"].isin(done_paths)]
    next_shard = int(records["shard"].max()) + 1 if len(records) else 0

    decoded_now, skipped_now = 0, 0
    decoder = _Decoder(workers if workers is not None else usable_cpus())
    bar = _progress_bar(len(todo), progress)
    try:
        rows = list(zip(todo["path"], todo["size"], todo["mtime"], strict=True))
        for start in range(0, len(rows), shard_size):
            batch = rows[start:start + shard_size]
            tasks = [(os.fspath(root / p), int(size), dtype, voi) for p, _, _ in batch]
            results = decoder.decode(tasks)
            _write_shard(out, next_shard, batch, results, size, dtype)
            next_shard += 1
            n_cached = sum(r["status"] == "cached" for r in results)
            decoded_now += n_cached
            skipped_now += len(results) - n_cached
            bar.update(len(batch))
    finally:
        bar.close()
        decoder.close()

    records = _finished_records(out)
    current = _current_records(records, ok)
    meta = ok[["path", *MANIFEST_META_COLUMNS]]
    cached = current[current["status"] == "cached"].merge(meta, on="path", how="left")
    cached = cached.sort_values(["shard", "position"], kind="stable").reset_index(drop=True)
    keys = patient_keys(cached["patient_id"].tolist(), cached["path"].tolist())
    cached["split"] = patient_splits(keys, split_fractions, split_seed)
    cached["patient_id"] = [k.split(":", 1)[1] if k.startswith("patient:") else None for k in keys]
    for col in ("shard", "position", "orig_h", "orig_w", "pad_top", "pad_left", "content_h", "content_w"):
        cached[col] = cached[col].astype("int64")
    index = cached[list(INDEX_COLUMNS)]
    skipped = current[current["status"] == "skipped"][["path", "reason"]].reset_index(drop=True)

    n_cached_total = int((records["status"] == "cached").sum())
    counts = {
        "manifest_rows": int(len(df)),
        "manifest_not_ok": int((df["status"] != "ok").sum()),
        "cached": int(len(index)),
        "decoded_now": decoded_now,
        "reused": int(len(index)) - decoded_now,
        "skipped": int(len(skipped)),
        "skipped_now": skipped_now,
        "shards": int(index["shard"].nunique()),
        "dead_slots": n_cached_total - int(len(index)),
    }
    summary = {
        "cache": os.fspath(out), **settings, **counts,
        "skipped_by_reason": dict(Counter(skipped["reason"]).most_common()),
        "splits": {s: int((index["split"] == s).sum()) for s in ("train", "val", "test")},
        "split_patients": {s: int(index.loc[index["split"] == s, "patient_id"].fillna(
            index["path"]).nunique()) for s in ("train", "val", "test")},
        "seconds": round(time.monotonic() - started, 3),
    }
    _write_parquet(skipped, out / "skipped.parquet")
    if not len(index):
        top = ", ".join(f"{reason}: {n}" for reason, n in list(summary["skipped_by_reason"].items())[:3])
        raise CacheError(f"no usable image in {manifest}: none of its {len(ok)} ok rows could be decoded "
                         f"({top}); each file's reason is in {out / 'skipped.parquet'}")
    if split_fractions[0] > 0 and not summary["splits"]["train"]:
        patients = sum(summary["split_patients"].values())
        raise CacheError(
            f"the train split of {manifest} is empty: its {patients} patient(s) all fell in val / test "
            f"(patient-level split by hashed id, fractions {' '.join(f'{f:g}' for f in split_fractions)}); "
            "with this few patients pass --split-fractions 1 0 0 (split_fractions=(1, 0, 0)) to put every "
            "image in train (the decoded images are kept: the rerun only splits them)")
    with atomic_write(out / "cache.json", "w") as f:
        json.dump({**settings, "complete": True, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   **counts, "skipped_by_reason": summary["skipped_by_reason"]}, f, indent=2)
    _write_parquet(index, out / "index.parquet")
    return summary


def format_cache_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines about a finished ``build_cache``."""
    s = summary
    lines = [
        f"cache {s['cache']}: {s['cached']} images of {s['size']}x{s['size']} {s['dtype']} (voi {s['voi']}) "
        f"in {s['shards']} shard(s); {s['decoded_now']} decoded now, {s['reused']} reused "
        f"({s['seconds']:.1f} s)",
        f"skipped: {s['skipped']} ({s['skipped_now']} now)",
    ]
    lines += [f"  {n:>7}  {reason}" for reason, n in s["skipped_by_reason"].items()]
    if s["manifest_not_ok"]:
        lines.append(f"not ok in the manifest (not decoded): {s['manifest_not_ok']}")
    if s["dead_slots"]:
        lines.append(f"dead slots of replaced images: {s['dead_slots']}")
    lines.append("splits (images / patients): " + ", ".join(
        f"{k} {s['splits'][k]} / {s['split_patients'][k]}" for k in ("train", "val", "test")))
    return "\n".join(lines)
