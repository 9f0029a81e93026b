"""The Parquet manifest that ``holons index`` writes: its columns and metadata, reading it, the parts
of an unfinished run, and the rows of earlier runs that a new run may reuse."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from holons.errors import HolonsError
from holons.files import atomic_path

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
_ROW_GROUP = 16384  # rows per Parquet row group of the final manifest (bounds the merge buffer)


class ManifestError(HolonsError):
    """A manifest path holds something that is not a readable holons manifest."""


# --------------------------------------------------------------------------- rows of earlier runs
@dataclass
class Previous:
    """Rows of the previous manifest and of finished parts of an interrupted run, looked up by path."""

    table: pa.Table
    index: pd.Index
    size: np.ndarray
    mtime: np.ndarray
    reusable: np.ndarray  # ok / skipped rows (errors are always read again)
    from_parts: np.ndarray
    note: str = ""

    @classmethod
    def empty(cls, note: str = "") -> Previous:
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


def load_previous(out: Path, parts_dir: Path, settings: str) -> tuple[Previous, int]:
    """Reusable rows (manifest, then parts in order; the last row of a path wins) and the next part number."""
    tables: list[pa.Table] = []
    sources: list[bool] = []
    notes = []
    if out.exists():
        table = read_table(out)
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
        return Previous.empty("; ".join(notes)), next_part
    lengths = [len(t) for t in tables]
    table = pa.concat_tables([t.select(list(MANIFEST_COLUMNS)).cast(MANIFEST_SCHEMA) for t in tables])
    from_parts = np.repeat(np.array(sources, bool), lengths)
    paths = pd.Index(table.column("path").to_numpy(zero_copy_only=False))
    keep = np.flatnonzero(~paths.duplicated(keep="last"))
    table = table.take(pa.array(keep))
    status = table.column("status").to_numpy(zero_copy_only=False)
    previous = Previous(
        table=table, index=paths[keep], size=table.column("size").to_numpy(),
        mtime=table.column("mtime").to_numpy(), reusable=(status == "ok") | (status == "skipped"),
        from_parts=from_parts[keep], note="; ".join(notes),
    )
    return previous, next_part


def read_table(path: Path) -> pa.Table:
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


# --------------------------------------------------------------------------- parts and the manifest
def write_part(path: Path, table: pa.Table) -> None:
    """Write one finished part atomically (a killed run never leaves a half part that looks valid)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_manifest(out: Path, parts: list[Path], metadata: dict[str, str]) -> None:
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



def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest as a DataFrame of ``MANIFEST_COLUMNS``, with ``df.attrs["archive_root"]``."""
    table = read_table(Path(path))
    df = table.select(list(MANIFEST_COLUMNS)).to_pandas()
    df.attrs["archive_root"] = table.schema.metadata[ROOT_KEY.encode()].decode()
    return df

