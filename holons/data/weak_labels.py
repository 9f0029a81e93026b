"""Image-level labels with boxes kept aside: what weakly supervised localization trains and is judged on.

A :class:`WeakLabelSet` lists images, one class per image (training sees only this), the split, and
the ground-truth boxes of each image in its own (source) pixel frame, ``(x0, y0, x1, y1)`` with the
pixel-centre convention of ``holons.finetune.metrics`` (pixel ``i`` spans ``[i - 0.5, i + 0.5]``). An
image without a box (a negative, or a positive nobody boxed) is not scored for localization.

Sources, detected from ``root``:

- phantoms (``holons synth radiographs``: ``image_table.csv`` with ``nodule_x``): one binary finding,
  ``nodule`` (box: centre ± half the diameter, in image pixels) or ``cardiomegaly`` (box of the
  heart mask); classes ``absent`` / ``present``; split column ``split``.
- JSRT (``image_table.csv`` with ``has_nodule`` and ``nodule_x_1024``): ``nodule``, centre in the
  1024 px frame of ``images_1024/``, diameter ``nodule_size_mm`` / 0.35 mm; split
  ``hybridgnet_split`` (train / val).
- a manifest CSV: ``path`` (relative to the CSV's folder) and ``label`` columns, optional
  ``split`` and optional box columns ``x0, y0, x1, y1`` (one box per row; repeat a path for more).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from holons.errors import HolonsError

__all__ = ["JSRT_PIXEL_MM", "ABSENT_PRESENT", "PHANTOM_FINDINGS", "WeakLabelSet", "load_weak_label_set",
           "circle_box", "mask_box"]

JSRT_PIXEL_MM = 0.35  # pixel size of JSRT's 1024 px frame
ABSENT_PRESENT = ("absent", "present")
PHANTOM_FINDINGS = ("nodule", "cardiomegaly")
_BOX_COLUMNS = ["x0", "y0", "x1", "y1"]


@dataclass
class WeakLabelSet:
    """Images with one class each (``labels``: index into ``classes``), their split and their boxes."""

    name: str
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    split: np.ndarray  # "train" | "val" | "test" | "all" per image
    boxes: list[np.ndarray] = field(repr=False)  # K x 4 per image, source frame; K = 0: not scored

    def indices(self, split: str) -> np.ndarray:
        """Positions of the images of one split (``"all"``: every image)."""
        return np.arange(len(self.paths)) if split == "all" else np.flatnonzero(self.split == split)

    def held_out_split(self) -> str:
        """The split evaluation uses: ``test`` where present, else ``val``, else ``all``."""
        return next((s for s in ("test", "val") if np.any(self.split == s)), "all")


def _flags(values: pd.Series) -> np.ndarray:
    return (pd.to_numeric(values, errors="coerce").fillna(0).to_numpy() > 0).astype(int)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The box (1 x 4: x0, y0, x1, y1 at pixel edges) around a binary mask's pixels; 0 x 4 when empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return np.zeros((0, 4))
    return np.array([[xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5]])


def circle_box(x: float, y: float, diameter: float) -> np.ndarray:
    """The box (1 x 4) around a round finding of centre (x, y) and ``diameter``, in pixels."""
    r = diameter / 2
    return np.array([[x - r, y - r, x + r, y + r]])


def _heart_box(mask_file: Path) -> np.ndarray:
    with Image.open(mask_file) as im:
        return mask_box(np.asarray(im.convert("L")) > 127)


def _phantoms(root: Path, table: pd.DataFrame, finding: str) -> WeakLabelSet:
    if finding not in PHANTOM_FINDINGS:
        raise HolonsError(f"phantoms have the findings {', '.join(PHANTOM_FINDINGS)}; got {finding!r}")
    labels = _flags(table[finding])
    boxes = []
    for row, label in zip(table.itertuples(index=False), labels, strict=True):
        if not label:
            boxes.append(np.zeros((0, 4)))
        elif finding == "nodule":
            boxes.append(circle_box(float(row.nodule_x), float(row.nodule_y), float(row.nodule_size)))
        else:
            boxes.append(_heart_box(root / "masks" / "heart" / f"{row.id}.png"))
    paths = [root / p if p else root / "images" / f"{i}.png"
             for p, i in zip(table["image_path"].fillna(""), table["id"], strict=True)]
    splits = table["split"].astype(str).to_numpy()
    return WeakLabelSet("phantoms", paths, labels, list(ABSENT_PRESENT), splits, boxes)


def _jsrt(root: Path, table: pd.DataFrame) -> WeakLabelSet:
    labels = _flags(table["has_nodule"])
    boxes = [circle_box(float(r.nodule_x_1024), float(r.nodule_y_1024),
                         float(r.nodule_size_mm) / JSRT_PIXEL_MM) if label else np.zeros((0, 4))
             for r, label in zip(table.itertuples(index=False), labels, strict=True)]
    paths = [root / "images_1024" / f"{i}.png" for i in table["image"]]
    return WeakLabelSet("jsrt", paths, labels, list(ABSENT_PRESENT),
                        table["hybridgnet_split"].astype(str).to_numpy(), boxes)


def _manifest(path: Path) -> WeakLabelSet:
    table = pd.read_csv(path, dtype={"path": str, "label": str, "split": str})
    if not {"path", "label"} <= set(table.columns) or table.empty:
        raise HolonsError(f"{path}: a weak-label manifest needs 'path' and 'label' columns and "
                          "at least one row")
    has_boxes = set(_BOX_COLUMNS) <= set(table.columns)
    classes = sorted(table["label"].astype(str).unique())
    images = table.drop_duplicates("path")
    paths, labels, splits, boxes = [], [], [], []
    for _, row in images.iterrows():
        rows = table[table["path"] == row["path"]]
        if rows["label"].nunique() > 1:
            raise HolonsError(f"{path}: {row['path']} has more than one label")
        p = Path(row["path"])
        paths.append(p if p.is_absolute() else path.parent / p)
        labels.append(classes.index(str(row["label"])))
        splits.append(str(row["split"]) if "split" in table.columns and pd.notna(row["split"]) else "all")
        found = rows[_BOX_COLUMNS].dropna().to_numpy(dtype=np.float64) if has_boxes else np.zeros((0, 4))
        boxes.append(found.reshape(-1, 4))
    return WeakLabelSet(path.stem, paths, np.asarray(labels), classes, np.asarray(splits, dtype=object),
                        boxes)


def load_weak_label_set(root: str | Path, finding: str | None = None) -> WeakLabelSet:
    """Open phantoms, JSRT or a manifest CSV (module docstring); ``finding`` picks the phantoms' finding
    (default ``nodule``)."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _manifest(root)
    table_file = root / "image_table.csv"
    if not table_file.is_file():
        raise HolonsError(f"{root} is neither a manifest CSV nor a folder with image_table.csv")
    table = pd.read_csv(table_file, dtype={"id": str, "image": str, "image_path": str})
    if {"nodule", "nodule_x", "cardiomegaly"} <= set(table.columns):
        return _phantoms(root, table, finding or "nodule")
    if {"has_nodule", "nodule_x_1024", "nodule_size_mm"} <= set(table.columns):
        if finding not in (None, "nodule"):
            raise HolonsError(f"JSRT has the finding 'nodule' only; got {finding!r}")
        return _jsrt(root, table)
    raise HolonsError(f"{table_file} has no findings with locations (phantoms: nodule_x, cardiomegaly; "
                      "JSRT: has_nodule, nodule_x_1024)")
