"""Writing protocol results: ``results.json`` (summary) and CSVs of per-item numbers, atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from holons.files import atomic_write

__all__ = ["json_safe", "write_results", "format_table"]


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN / inf to None, tuples to lists, paths to strings."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out: str | Path, summary: Mapping[str, Any], tables: Mapping[str, pd.DataFrame]) -> Path:
    """Write ``OUT/results.json`` and ``OUT/<name>.csv`` for each table; returns the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        with atomic_write(out / f"{name}.csv", "w") as f:
            frame.to_csv(f, index=False, float_format="%.6g", lineterminator="\n")
    path = out / "results.json"
    with atomic_write(path, "w") as f:
        json.dump(json_safe(dict(summary)), f, indent=2)
        f.write("\n")
    return path


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (floats with 3 decimals, missing values as '-')."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.3f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
