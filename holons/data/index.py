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

This module walks the archive and runs the index; ``holons.data.index_readers`` turns one file into a row
and ``holons.data.manifest`` holds the manifest format, its parts and the rows of earlier runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from holons.data.index_readers import READ_CHUNK, Readers, ReadOptions, reclassify
from holons.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    ROOT_KEY,
    SETTINGS_KEY,
    Previous,
    load_previous,
    write_manifest,
    write_part,
)
from holons.data.privacy import load_site_secret
from holons.data.workers import usable_cpus
from holons.errors import HolonsError

__all__ = ["index_archive", "format_summary", "load_site_secret", "require_images"]

log = logging.getLogger(__name__)


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
    options = ReadOptions(
        root=str(root), secret=secret,
        modalities=frozenset(m.strip().upper() for m in modalities) if modalities is not None else None,
        body_parts=frozenset(b.strip().upper() for b in body_parts) if body_parts is not None else None,
        min_size=int(min_size),
    )
    settings = options.settings_key()
    metadata = {ROOT_KEY: str(root), SETTINGS_KEY: settings}
    workers = max(1, int(workers) if workers else usable_cpus())
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
        previous, next_part = load_previous(out, parts_dir, settings)
        if previous.note:
            log.info(previous.note)
        readers = Readers(workers, options)
        bar = tqdm(unit=" files", desc="index", disable=not show, dynamic_ncols=True)

        def finish(batch: _Pending) -> None:
            nonlocal next_part
            new_rows: list[tuple] = []
            for chunk, (future, generation) in zip(batch.chunks, batch.futures, strict=True):
                new_rows.extend(readers.rows(chunk, future, generation))
            table = _batch_table(batch, new_rows, previous, options)
            part = parts_dir / f"part-{next_part:06d}.parquet"
            next_part += 1
            write_part(part, table.replace_schema_metadata(metadata))
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
            max_pending = max(2, workers * 4 * READ_CHUNK // part_size + 1)
            pending: deque[_Pending] = deque()
            walk = _walk(str(root), {str(out), str(parts_dir)}, counters)
            for batch in _batched(walk, part_size):
                rels, sizes, mtimes = (list(col) for col in zip(*batch, strict=True))
                reuse, known = previous.match(rels, sizes, mtimes)
                counters["n_known"] += known
                todo = [batch[i] for i in np.flatnonzero(reuse < 0)]
                item = _Pending(rels=rels, reuse=reuse)
                for start in range(0, len(todo), READ_CHUNK):
                    chunk = todo[start:start + READ_CHUNK]
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
        write_manifest(out, my_parts, metadata)
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
    batch: _Pending, new_rows: list[tuple], previous: Previous, options: ReadOptions
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
    old = reclassify(old, options)
    both = pa.concat_tables([old, fresh])
    order = np.argsort(np.concatenate([reused_at, read_at]), kind="stable")
    return both.take(pa.array(order))


def _no_modality(fmt: str) -> str:
    if fmt == "dicom":
        return "(none recorded)"
    return f"({fmt})" if fmt else "(not an image)"




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
