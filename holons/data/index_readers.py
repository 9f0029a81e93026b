"""Reading one archive file into a manifest row, in worker processes that survive a crashing reader.

Rows never carry raw identifiers: patient / study / series ids are keyed hashes (``holons.data.privacy``)
and reasons are words, never header values.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from holons.data.formats import detect_format
from holons.data.headers import HeaderError, read_header, safe_message
from holons.data.manifest import MANIFEST_COLUMNS, MANIFEST_VERSION
from holons.data.privacy import pseudonymize, secret_fingerprint

_FILTER_REASONS = ("modality ", "body part ", "smaller than ")  # reasons that _classify gives for filters
READ_CHUNK = 64  # files per task sent to a worker


@dataclass(frozen=True)
class ReadOptions:
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


_WORKER_OPTIONS: ReadOptions | None = None


def _init_worker(options: ReadOptions) -> None:
    global _WORKER_OPTIONS
    _WORKER_OPTIONS = options
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _read_chunk(tasks: list[tuple[str, int, int]]) -> list[tuple]:
    """Worker entry point: one manifest row (a tuple in ``MANIFEST_COLUMNS`` order) per task."""
    assert _WORKER_OPTIONS is not None
    return [_read_row(_WORKER_OPTIONS, *task) for task in tasks]


def _read_row(options: ReadOptions, rel: str, size: int, mtime: int) -> tuple:
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


def _classify(header: dict[str, Any], options: ReadOptions) -> tuple[str, str]:
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


def reclassify(table: pa.Table, options: ReadOptions) -> pa.Table:
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


# --------------------------------------------------------------------------- worker pool
class Readers:
    """Reads chunks of files in worker processes (or in-process for workers=1), surviving worker crashes.

    A crash of a reader library kills its worker and breaks the pool; the pool is then restarted, chunks of
    the broken pool are retried, and a chunk that breaks a fresh pool is read file by file so that only the
    file that crashes gets an error row.
    """

    def __init__(self, workers: int, options: ReadOptions):
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

