"""Archive index: one manifest row per file of an image archive, read from headers only.

``index_archive`` walks a directory tree (symlinks not followed, hidden entries skipped) as a stream, reads
headers in worker processes, and writes a Parquet manifest with the columns ``MANIFEST_COLUMNS``:

- ``path`` is POSIX and relative to the archive root, which is kept in the Parquet schema metadata
  (``holons.archive_root``); ``mtime`` is in nanoseconds since the epoch; unknown numbers are 0, unknown
  text is "".
- ``status`` is ``ok``, ``skipped`` (not an image, a non-image DICOM object, filtered out) or ``error``
  (unreadable, truncated), with ``reason`` in words.
- patient / study / series ids are keyed hashes (``holons.data.privacy``); no raw identifier, name, birth
  date or accession number is written anywhere, reasons included.

Rows are written in parts (``MANIFEST.parts/part-NNNNNN.parquet``) as they finish, so a killed run loses at
most the parts in flight; the next run reuses every finished row, and also every row of the previous
manifest whose file has the same size and mtime (files that errored are read again). The manifest itself
is replaced atomically at the end, so the file on disk is always a complete manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from holons.data.formats import detect_format
from holons.data.headers import HeaderError, read_header, safe_message
from holons.data.privacy import load_site_secret, pseudonymize, secret_fingerprint
from holons.errors import HolonsError
from holons.files import atomic_path

__all__ = ["MANIFEST_COLUMNS", "index_archive", "format_summary", "read_manifest", "load_site_secret",
           "require_images"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "path", "size", "mtime", "format", "modality", "body_part", "view_position", "rows", "cols",
    "photometric", "bits_stored", "transfer_syntax", "patient_id", "study_id", "series_id",
    "status", "reason",
)
MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.int64()), ("format", pa.string()),
    ("modality", pa.string()), ("body_part", pa.string()), ("view_position", pa.string()),
    ("rows", pa.int32()), ("cols", pa.int32()), ("photometric", pa.string()), ("bits_stored", pa.int32()),
    ("transfer_syntax", pa.string()), ("patient_id", pa.string()), ("study_id", pa.string()),
    ("series_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
])
ROOT_KEY = "holons.archive_root"
SETTINGS_KEY = "holons.index_settings"
MANIFEST_VERSION = 1

_MOVE_ASIDE = "remove it or choose another path"
_FILTER_REASONS = ("modality ", "body part ", "smaller than ")  # reasons that _classify gives for filters
_READ_CHUNK = 64  # files per task sent to a worker
_ROW_GROUP = 16384  # rows per Parquet row group of the final manifest (bounds the merge buffer)


class ManifestError(HolonsError):
    """A manifest path holds something that is not a readable holons manifest."""


# --------------------------------------------------------------------------- reading one file (workers)
@dataclass(frozen=True)
class _ReadOptions:
    """Everything a worker needs to turn a file into a manifest row."""

    root: str
    secret: bytes | None
    modalities: frozenset[str] | None
    body_parts: frozenset[str] | None
    min_size: int

    def settings_key(self) -> str:
        """What must match for rows of an earlier run to be reused (never the secret itself).

        Filters are not part of it: reused rows are classified again under the current filters.
        """
        ids = secret_fingerprint(self.secret)
        return json.dumps({"version": MANIFEST_VERSION, "root": self.root, "ids": ids}, sort_keys=True)


_WORKER_OPTIONS: _ReadOptions | None = None


def _init_worker(options: _ReadOptions) -> None:
    global _WORKER_OPTIONS
    _WORKER_OPTIONS = options
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _read_chunk(tasks: list[tuple[str, int, int]]) -> list[tuple]:
    """Worker entry point: one manifest row (a tuple in ``MANIFEST_COLUMNS`` order) per task."""
    assert _WORKER_OPTIONS is not None
    return [_read_row(_WORKER_OPTIONS, *task) for task in tasks]


def _read_row(options: _ReadOptions, rel: str, size: int, mtime: int) -> tuple:
    """One manifest row for the file ``rel`` (relative to ``options.root``); never raises for a bad file."""
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(path=rel, size=size, mtime=mtime, rows=0, cols=0, bits_stored=0)
    path = os.path.join(options.root, rel)
    try:
        fmt = detect_format(path)
        if fmt is None:
            with open(path, "rb"):  # distinguishes "unreadable" from "not an image"
                pass
            row.update(status="skipped", reason="not an image")
            return _as_tuple(row)
        row["format"] = fmt
        header = read_header(path, fmt)
    except HeaderError as e:
        row.update(status="error", reason=e.reason)
        return _as_tuple(row)
    except OSError as e:
        row.update(status="error", reason=f"cannot open file: {e.strerror or safe_message(e)}")
        return _as_tuple(row)
    except Exception as e:  # a reader bug must not stop a long job; the reason carries no values
        row.update(status="error", reason=f"unexpected failure: {safe_message(e)}")
        return _as_tuple(row)
    for key in ("modality", "body_part", "view_position", "rows", "cols", "photometric", "bits_stored",
                "transfer_syntax"):
        row[key] = header[key]
    row["patient_id"] = pseudonymize(header["raw_patient_id"], options.secret)
    row["study_id"] = pseudonymize(header["raw_study_id"], options.secret)
    row["series_id"] = pseudonymize(header["raw_series_id"], options.secret)
    row["status"], row["reason"] = _classify(header, options)
    return _as_tuple(row)


def _crash_row(task: tuple[str, int, int]) -> tuple:
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(path=task[0], size=task[1], mtime=task[2], rows=0, cols=0, bits_stored=0, status="error",
               reason="header reader crashed the worker process")
    return _as_tuple(row)


def _as_tuple(row: dict[str, Any]) -> tuple:
    return tuple(row[c] for c in MANIFEST_COLUMNS)


def _classify(header: dict[str, Any], options: _ReadOptions) -> tuple[str, str]:
    """(status, reason) of a readable file after the non-image check and the user's filters.

    Modality and body-part filters apply to DICOM only; other formats carry no such tags and pass them.
    """
    if header["skip"]:
        return "skipped", header["skip"]
    if header["format"] == "dicom":
        for name, value, wanted in (("modality", header["modality"], options.modalities),
                                    ("body part", header["body_part"], options.body_parts)):
            if wanted is None:
                continue
            if not value:
                return "skipped", f"{name} not recorded"
            if value not in wanted:
                return "skipped", f"{name} {_token(value)} not selected"
    if options.min_size and min(header["rows"], header["cols"]) < options.min_size:
        return "skipped", f"smaller than {options.min_size} px"
    return "ok", ""


def _reclassify(table: pa.Table, options: _ReadOptions) -> pa.Table:
    """Status and reason of reused rows under the current filters (rows skipped for other reasons stay)."""
    statuses, reasons = table.column("status").to_pylist(), table.column("reason").to_pylist()
    columns = {c: table.column(c).to_pylist() for c in ("format", "modality", "body_part", "rows", "cols")}
    for i, (status, reason) in enumerate(zip(statuses, reasons, strict=True)):
        if status == "ok" or (status == "skipped" and reason.startswith(_FILTER_REASONS)):
            header = {c: values[i] for c, values in columns.items()}
            statuses[i], reasons[i] = _classify({**header, "skip": None}, options)
    for name, values in (("status", statuses), ("reason", reasons)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def _token(value: str) -> str:
    """A coded value (modality, body part) made safe to show: letters, digits, _ and space, short."""
    return "".join(ch for ch in value.upper() if ch.isalnum() or ch in "_ ")[:16] or "?"


# --------------------------------------------------------------------------- walking the archive
def _walk(root: str, exclude: set[str], counters: Counter) -> Iterator[tuple[str, int, int]]:
    """Stream ``(relative POSIX path, size, mtime_ns)`` of regular files under ``root``.

    Hidden entries, symlinks and special files are skipped; unreadable folders are counted, not fatal.
    Entries are streamed in directory order, so a folder of millions of files is never held in memory.
    """
    prefix = root.rstrip(os.sep) + os.sep
    stack = [root]
    while stack:
        folder = stack.pop()
        subfolders = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or entry.path in exclude:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subfolders.append(entry.path)
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished while walking
                    rel = entry.path[len(prefix):]
                    if os.sep != "/":
                        rel = rel.replace(os.sep, "/")
                    try:
                        rel.encode("utf-8")
                    except UnicodeEncodeError:
                        counters["names_not_utf8"] += 1
                        continue
                    yield rel, st.st_size, st.st_mtime_ns
        except OSError:
            counters["unreadable_folders"] += 1
        stack.extend(sorted(subfolders, reverse=True))


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- rows of earlier runs
@dataclass
class _Previous:
    """Rows of the previous manifest and of finished parts of an interrupted run, looked up by path."""

    table: pa.Table
    index: pd.Index
    size: np.ndarray
    mtime: np.ndarray
    reusable: np.ndarray  # ok / skipped rows (errors are always read again)
    from_parts: np.ndarray
    note: str = ""

    @classmethod
    def empty(cls, note: str = "") -> _Previous:
        return cls(MANIFEST_SCHEMA.empty_table(), pd.Index([], dtype=object), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool), note)

    def match(self, rels: list[str], sizes: list[int], mtimes: list[int]) -> tuple[np.ndarray, int]:
        """Row index to reuse for each file (-1: read it), and how many files were known at all."""
        if len(self.index) == 0:
            return np.full(len(rels), -1), 0
        idx = self.index.get_indexer(rels)
        known = idx >= 0
        safe = np.where(known, idx, 0)
        same = known & (self.size[safe] == np.asarray(sizes)) & (self.mtime[safe] == np.asarray(mtimes))
        same &= self.reusable[safe]
        return np.where(same, idx, -1), int(known.sum())


def _load_previous(out: Path, parts_dir: Path, settings: str) -> tuple[_Previous, int]:
    """Reusable rows (manifest, then parts in order; the last row of a path wins) and the next part number."""
    tables: list[pa.Table] = []
    sources: list[bool] = []
    notes = []
    if out.exists():
        table = _read_table(out)
        if table.schema.metadata.get(SETTINGS_KEY.encode(), b"").decode() == settings:
            tables.append(table)
            sources.append(False)
        else:
            notes.append("archive root or site secret changed since the last run: every file is read again")
    next_part = 0
    for part in sorted(parts_dir.glob("part-*.parquet")):
        with contextlib.suppress(ValueError):
            next_part = max(next_part, int(part.stem.split("-")[1]) + 1)
        try:
            table = pq.read_table(part)
        except (OSError, pa.ArrowException):
            continue
        if (table.schema.metadata or {}).get(SETTINGS_KEY.encode(), b"").decode() == settings:
            tables.append(table.select(list(MANIFEST_COLUMNS)))
            sources.append(True)
    if not tables:
        return _Previous.empty("; ".join(notes)), next_part
    lengths = [len(t) for t in tables]
    table = pa.concat_tables([t.select(list(MANIFEST_COLUMNS)).cast(MANIFEST_SCHEMA) for t in tables])
    from_parts = np.repeat(np.array(sources, bool), lengths)
    paths = pd.Index(table.column("path").to_numpy(zero_copy_only=False))
    keep = np.flatnonzero(~paths.duplicated(keep="last"))
    table = table.take(pa.array(keep))
    status = table.column("status").to_numpy(zero_copy_only=False)
    previous = _Previous(
        table=table, index=paths[keep], size=table.column("size").to_numpy(),
        mtime=table.column("mtime").to_numpy(), reusable=(status == "ok") | (status == "skipped"),
        from_parts=from_parts[keep], note="; ".join(notes),
    )
    return previous, next_part


def _read_table(path: Path) -> pa.Table:
    """A manifest as an Arrow table; a clear error when ``path`` is something else."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except (OSError, pa.ArrowException):
        raise ManifestError(f"{path} is not a readable Parquet manifest; {_MOVE_ASIDE}") from None
    meta = table.schema.metadata or {}
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if ROOT_KEY.encode() not in meta or missing:
        raise ManifestError(f"{path} is not a manifest written by `holons index`; {_MOVE_ASIDE}")
    return table


# --------------------------------------------------------------------------- worker pool
class _Readers:
    """Reads chunks of files in worker processes (or in-process for workers=1), surviving worker crashes.

    A crash of a reader library kills its worker and breaks the pool; the pool is then restarted, chunks of
    the broken pool are retried, and a chunk that breaks a fresh pool is read file by file so that only the
    file that crashes gets an error row.
    """

    def __init__(self, workers: int, options: _ReadOptions):
        self.workers = workers
        self.options = options
        self.generation = 0
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._start()

    def _start(self) -> None:
        self.pool = ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(self.options,))

    def restart(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.generation += 1
        self._start()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def submit(self, chunk: list[tuple[str, int, int]]) -> tuple[Future, int]:
        if self.pool is None:
            future: Future = Future()
            future.set_result([_read_row(self.options, *task) for task in chunk])
            return future, self.generation
        return self.pool.submit(_read_chunk, chunk), self.generation

    def rows(self, chunk: list[tuple[str, int, int]], future: Future, generation: int) -> list[tuple]:
        try:
            return future.result()
        except BrokenProcessPool:
            pass
        if generation != self.generation:  # broken by a crash elsewhere: retry in the current pool
            return self.rows(chunk, *self.submit(chunk))
        self.restart()
        if len(chunk) == 1:
            return [_crash_row(chunk[0])]
        out: list[tuple] = []
        for task in chunk:
            out.extend(self.rows([task], *self.submit([task])))
        return out


# --------------------------------------------------------------------------- parts and the manifest
def _write_part(path: Path, table: pa.Table) -> None:
    """Write one finished part atomically (a killed run never leaves a half part that looks valid)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_manifest(out: Path, parts: list[Path], metadata: dict[str, str]) -> None:
    """Concatenate this run's parts into ``out`` atomically, streaming (one row group in memory)."""
    schema = MANIFEST_SCHEMA.with_metadata(metadata)
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            buffer: list[pa.Table] = []
            buffered = 0
            for part in parts:
                table = pq.read_table(part).select(list(MANIFEST_COLUMNS)).cast(MANIFEST_SCHEMA)
                buffer.append(table)
                buffered += len(table)
                if buffered >= _ROW_GROUP:
                    writer.write_table(pa.concat_tables(buffer).replace_schema_metadata(metadata))
                    buffer, buffered = [], 0
            if buffer or not parts:
                table = pa.concat_tables(buffer) if buffer else MANIFEST_SCHEMA.empty_table()
                writer.write_table(table.replace_schema_metadata(metadata))


@contextlib.contextmanager
def _exclusive(parts_dir: Path) -> Iterator[None]:
    """Refuse a second concurrent run on the same manifest (an advisory lock on the parts folder)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(parts_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HolonsError(f"another `holons index` is writing {parts_dir.with_suffix('')}") from None
        yield
    finally:
        os.close(fd)


@dataclass
class _Pending:
    """A batch of walked files whose rows are being read."""

    rels: list[str]
    reuse: np.ndarray
    chunks: list[list[tuple[str, int, int]]] = field(default_factory=list)
    futures: list[tuple[Future, int]] = field(default_factory=list)


# --------------------------------------------------------------------------- the index
def index_archive(
    archive: str | os.PathLike,
    out: str | os.PathLike,
    *,
    secret: bytes | None,
    modalities: tuple[str, ...] | None = ("CR", "DX"),
    body_parts: tuple[str, ...] | None = None,
    min_size: int = 0,
    workers: int | None = None,
    progress: bool | None = None,
    part_size: int = 2048,
) -> dict:
    """Index every file under ``archive`` into the Parquet manifest ``out``; return a summary dict.

    ``secret`` keys the id hashes (None: plain SHA-256, see ``load_site_secret``). ``modalities`` and
    ``body_parts`` keep only DICOM files with those values (None keeps all); images with rows or cols below
    ``min_size`` are skipped. ``workers`` processes read headers (default: CPU count; 1 reads in-process).
    ``progress`` shows a bar (None: only when stderr is a terminal). ``part_size`` files make one part.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    root = Path(archive).expanduser()
    if not root.is_dir():
        raise HolonsError(f"archive folder not found: {archive}")
    root = root.resolve()
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise HolonsError(f"the manifest path is a folder: {out}")
    parts_dir = out.with_name(out.name + ".parts")
    options = _ReadOptions(
        root=str(root), secret=secret,
        modalities=frozenset(m.strip().upper() for m in modalities) if modalities is not None else None,
        body_parts=frozenset(b.strip().upper() for b in body_parts) if body_parts is not None else None,
        min_size=int(min_size),
    )
    settings = options.settings_key()
    metadata = {ROOT_KEY: str(root), SETTINGS_KEY: settings}
    workers = max(1, int(workers) if workers else _cpu_count())
    parts_dir.mkdir(parents=True, exist_ok=True)

    counters: Counter = Counter()
    by_status: Counter = Counter()
    by_modality: Counter = Counter()
    by_reason: Counter = Counter()
    my_parts: list[Path] = []
    show = sys.stderr.isatty() if progress is None else progress
    with _exclusive(parts_dir):
        for tmp in parts_dir.glob(".*.tmp"):  # half-written parts of a killed run
            tmp.unlink(missing_ok=True)
        previous, next_part = _load_previous(out, parts_dir, settings)
        if previous.note:
            log.info(previous.note)
        readers = _Readers(workers, options)
        bar = tqdm(unit=" files", desc="index", disable=not show, dynamic_ncols=True)

        def finish(batch: _Pending) -> None:
            nonlocal next_part
            new_rows: list[tuple] = []
            for chunk, (future, generation) in zip(batch.chunks, batch.futures, strict=True):
                new_rows.extend(readers.rows(chunk, future, generation))
            table = _batch_table(batch, new_rows, previous, options)
            part = parts_dir / f"part-{next_part:06d}.parquet"
            next_part += 1
            _write_part(part, table.replace_schema_metadata(metadata))
            my_parts.append(part)
            reused = batch.reuse[batch.reuse >= 0]
            counters["n_resumed"] += int(previous.from_parts[reused].sum())
            counters["n_reused"] += int((~previous.from_parts[reused]).sum())
            counters["n_new"] += len(new_rows)
            statuses = table.column("status").to_pylist()
            by_status.update(statuses)
            for modality, fmt in zip(table.column("modality").to_pylist(), table.column("format").to_pylist(),
                                     strict=True):
                by_modality[modality or _no_modality(fmt)] += 1
            by_reason.update(r for r in table.column("reason").to_pylist() if r)
            bar.update(len(table))
            bar.set_postfix(ok=by_status["ok"], skipped=by_status["skipped"], error=by_status["error"],
                            refresh=False)

        try:
            max_pending = max(2, workers * 4 * _READ_CHUNK // part_size + 1)
            pending: deque[_Pending] = deque()
            walk = _walk(str(root), {str(out), str(parts_dir)}, counters)
            for batch in _batched(walk, part_size):
                rels, sizes, mtimes = (list(col) for col in zip(*batch, strict=True))
                reuse, known = previous.match(rels, sizes, mtimes)
                counters["n_known"] += known
                todo = [batch[i] for i in np.flatnonzero(reuse < 0)]
                item = _Pending(rels=rels, reuse=reuse)
                for start in range(0, len(todo), _READ_CHUNK):
                    chunk = todo[start:start + _READ_CHUNK]
                    item.chunks.append(chunk)
                    item.futures.append(readers.submit(chunk))
                pending.append(item)
                while len(pending) > max_pending:
                    finish(pending.popleft())
            while pending:
                finish(pending.popleft())
        finally:
            readers.close()
            bar.close()
        _write_manifest(out, my_parts, metadata)
    shutil.rmtree(parts_dir, ignore_errors=True)

    elapsed = time.perf_counter() - started
    n_files = sum(by_status.values())
    return {
        "archive": str(root), "manifest": str(out), "n_files": n_files,
        "n_new": counters["n_new"], "n_reused": counters["n_reused"], "n_resumed": counters["n_resumed"],
        "n_removed": len(previous.index) - counters["n_known"],
        "by_status": dict(by_status), "by_modality": dict(by_modality), "by_reason": dict(by_reason),
        "unreadable_folders": counters["unreadable_folders"], "names_not_utf8": counters["names_not_utf8"],
        "workers": workers, "elapsed_s": elapsed, "files_per_s": n_files / elapsed if elapsed > 0 else 0.0,
        "note": previous.note,
    }


def _batch_table(
    batch: _Pending, new_rows: list[tuple], previous: _Previous, options: _ReadOptions
) -> pa.Table:
    """Rows of one batch in walk order: reused rows taken from ``previous``, the others freshly read."""
    reused_at = np.flatnonzero(batch.reuse >= 0)
    read_at = np.flatnonzero(batch.reuse < 0)
    columns = list(zip(*new_rows, strict=True)) if new_rows else [[] for _ in MANIFEST_COLUMNS]
    fresh = pa.table([pa.array(col, type=MANIFEST_SCHEMA.field(name).type)
                      for name, col in zip(MANIFEST_COLUMNS, columns, strict=True)], schema=MANIFEST_SCHEMA)
    if len(reused_at) == 0:
        return fresh
    old = previous.table.take(pa.array(batch.reuse[reused_at])).replace_schema_metadata(None)
    old = _reclassify(old, options)
    both = pa.concat_tables([old, fresh])
    order = np.argsort(np.concatenate([reused_at, read_at]), kind="stable")
    return both.take(pa.array(order))


def _no_modality(fmt: str) -> str:
    if fmt == "dicom":
        return "(none recorded)"
    return f"({fmt})" if fmt else "(not an image)"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- reading and reporting
def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest as a DataFrame of ``MANIFEST_COLUMNS``, with ``df.attrs["archive_root"]``."""
    table = _read_table(Path(path))
    df = table.select(list(MANIFEST_COLUMNS)).to_pandas()
    df.attrs["archive_root"] = table.schema.metadata[ROOT_KEY.encode()].decode()
    return df


def require_images(summary: dict) -> None:
    """Raise a one-line HolonsError when an ``index_archive`` summary has no ``ok`` image.

    Such a manifest feeds nothing (``holons cache`` decodes ``ok`` rows only): an empty folder, the
    wrong folder, or filters that keep nothing. The manifest is still written, with each file's reason.
    """
    if summary["by_status"].get("ok", 0):
        return
    archive, n = summary["archive"], summary["n_files"]
    if n == 0:
        raise HolonsError(f"no files found in {archive} (hidden files and symlinks are skipped); "
                          "nothing to index")
    reasons = sorted(summary["by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{reason}: {count}" for reason, count in reasons[:3])
    more = f", {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
    hint = ("; `--modality` with no values keeps every modality"
            if any(r.startswith("modality ") for r, _ in reasons) else "")
    files = f"{n} file{'s' if n != 1 else ''}"
    raise HolonsError(f"no usable image in {archive}: {files}, none ok ({shown}{more}); "
                      f"each file's reason is in {summary['manifest']}{hint}")


def format_summary(summary: dict, top: int = 10) -> str:
    """A short human-readable report of an ``index_archive`` summary."""
    s = summary
    lines = [
        f"indexed {s['n_files']} files in {s['elapsed_s']:.1f} s ({s['files_per_s']:.0f} files/s, "
        f"{s['workers']} workers) -> {s['manifest']}",
        f"  read {s['n_new']}, reused {s['n_reused']} unchanged, resumed {s['n_resumed']}, "
        f"dropped {s['n_removed']} deleted",
        "  status:   " + _counts(s["by_status"], top),
        "  modality: " + _counts(s["by_modality"], top),
    ]
    if s["by_reason"]:
        lines.append("  reasons:")
        for reason, n in sorted(s["by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
            lines.append(f"    {n:>8}  {reason}")
        if len(s["by_reason"]) > top:
            lines.append(f"    ... and {len(s['by_reason']) - top} more reasons (see the manifest)")
    for key, what in (("unreadable_folders", "unreadable folders"), ("names_not_utf8", "non-UTF-8 names")):
        if s.get(key):
            lines.append(f"  skipped {s[key]} {what}")
    if s.get("note"):
        lines.append(f"  note: {s['note']}")
    return "\n".join(lines)


def _counts(counts: dict[str, int], top: int) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} {v}" for k, v in items[:top])
    if len(items) > top:
        text += f", ... ({len(items) - top} more)"
    return text or "none"
