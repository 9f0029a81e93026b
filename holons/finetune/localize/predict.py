"""Applying a localizer folder: per-image maps and boxes in the source image's geometry.

Each image is prepared with the folder's :class:`~holons.data.preprocess.Preprocessing`; the map
(of the predicted class, or of a given class per image) is computed on the canvas and mapped back
onto the source grid with :meth:`~holons.data.preprocess.Geometry.map_to_source` (letterbox padding
dropped). The box is that of the largest 8-connected region of ``map >= box_fraction * max``, in
source pixels with the pixel-centre convention of the metrics (pixel ``i`` spans ``[i - 0.5, i + 0.5]``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from holons.data.image import describe_error
from holons.data.preprocess import Geometry
from holons.errors import HolonsError
from holons.files import atomic_path, atomic_write
from holons.finetune.inputs import READ_ERRORS
from holons.finetune.localize.folder import load_localizer
from holons.runs import resolve_device

__all__ = ["MapPrediction", "box_from_map", "predict_maps", "write_predictions"]


@dataclass
class MapPrediction:
    """Per image: its map on the source grid (``H_i x W_i`` in [0, 1]), its box, the class the map is
    of, and the class probabilities."""

    names: list[str]
    maps: list[np.ndarray]
    boxes: np.ndarray  # N x 4 (x0, y0, x1, y1), source pixels; NaN where the map is empty
    map_classes: np.ndarray  # class index each map is of
    probabilities: np.ndarray  # N x K
    classes: list[str]


def box_from_map(values: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """The box ``(x0, y0, x1, y1)`` of the largest 8-connected region of ``values >= fraction * max``
    (all NaN when the map has no positive value)."""
    values = np.asarray(values, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if not peak > 0:
        return np.full(4, np.nan)
    labels, n = ndimage.label(values >= fraction * peak, structure=np.ones((3, 3), dtype=bool))
    sizes = ndimage.sum_labels(np.ones_like(values), labels, index=np.arange(1, n + 1))
    sy, sx = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    return np.array([sx.start - 0.5, sy.start - 0.5, sx.stop - 0.5, sy.stop - 0.5])


def _prepare(item: str | Path | np.ndarray, preprocessing) -> tuple[np.ndarray, Geometry]:
    if isinstance(item, np.ndarray):
        return preprocessing.apply(item)
    return preprocessing.read(item)


@torch.no_grad()
def predict_maps(model_folder: str | Path, images: Sequence[str | Path | np.ndarray], *,
                 target: Sequence[int] | None = None, box_fraction: float = 0.5, batch_size: int = 16,
                 device: str = "auto", progress: bool = False,
                 skipped: list[tuple[str, str]] | None = None) -> MapPrediction:
    """Maps and boxes of ``images`` (files, or ``H x W`` arrays in [0, 1]) from the folder's model;
    ``target`` gives the class whose map to draw per image (default: the predicted class).
    ``skipped``: a list that collects (path, reason) of unreadable files, which are then left out
    (each image is decoded once); without it an unreadable file raises."""
    if not 0 < box_fraction < 1:
        raise HolonsError(f"box_fraction must be within (0, 1), got {box_fraction}")
    if target is not None and len(target) != len(images):
        raise HolonsError(f"target has {len(target)} classes for {len(images)} images")
    dev = resolve_device(device)
    loaded = load_localizer(model_folder, dev)
    names, maps, boxes, chosen, probs = [], [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="localize", disable=not progress):
        prepared, kept = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                prepared.append(_prepare(images[i], loaded.preprocessing))
            except READ_ERRORS as e:
                if skipped is None:
                    raise
                skipped.append((str(images[i]), describe_error(e)))
                continue
            kept.append(i)
        if not kept:
            continue
        names += [f"image_{i}" if isinstance(images[i], np.ndarray) else Path(images[i]).name for i in kept]
        x = torch.from_numpy(np.stack([c for c, _ in prepared]))[:, None].to(dev)
        p = loaded.module.logits(x).softmax(dim=1)
        which = p.argmax(dim=1) if target is None else torch.as_tensor(
            [int(target[i]) for i in kept], device=dev)
        canvas_maps = loaded.module.localization_map(x, which).cpu().numpy()
        for m, (_, geometry) in zip(canvas_maps, prepared, strict=True):
            source = np.clip(geometry.map_to_source(m), 0.0, 1.0)
            maps.append(source)
            boxes.append(box_from_map(source, box_fraction))
        chosen.append(which.cpu().numpy())
        probs.append(p.cpu().numpy())
    k = len(loaded.classes)
    return MapPrediction(names, maps, np.array(boxes).reshape(-1, 4),
                         np.concatenate(chosen) if chosen else np.zeros(0, int),
                         np.concatenate(probs) if probs else np.zeros((0, k)), loaded.classes)


def write_predictions(prediction: MapPrediction, out: str | Path) -> Path:
    """``OUT/boxes.csv`` (one row per image: name, class, probabilities, box) and ``OUT/maps/<name>.png``
    (8-bit map in the source geometry); returns the CSV path."""
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(prediction.names):
        stem = Path(name).stem
        with atomic_path(out / "maps" / f"{stem}.png") as tmp:
            Image.fromarray(np.round(prediction.maps[i] * 255).astype(np.uint8)).save(tmp, format="PNG")
        x0, y0, x1, y1 = prediction.boxes[i]
        rows.append({"image": name, "map_class": prediction.classes[int(prediction.map_classes[i])],
                     **{f"p_{c}": f"{prediction.probabilities[i, j]:.6f}"
                        for j, c in enumerate(prediction.classes)},
                     "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    path = out / "boxes.csv"
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["image"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path
