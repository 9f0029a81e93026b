"""Judging a weakly supervised localizer on boxes it never saw.

Metrics (maps and boxes in the source image's frame, boxes ``(x0, y0, x1, y1)`` with the pixel-centre
convention of ``holons.finetune.metrics``):

- MaxBoxAccV2 at IoU 0.3 / 0.5 / 0.7 (``holons.finetune.metrics.max_box_acc_v2``: best map threshold per
  IoU, all regions' boxes);
- the pointing game: the map's peak pixel lies in a ground-truth box (grown by ``tolerance`` pixels);
- top-1 localization: the predicted class is right and, at the threshold that is best for BoxAcc at
  IoU 0.5, some region's box overlaps a ground-truth box by at least 0.5;
- classification AUC over all images of the split (``holons.finetune.metrics.auc``).

Maps are those of each image's true class ("ground-truth known"), computed by
``holons.finetune.localize.predict.predict_maps``; only images with boxes are scored for localization.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from holons.data.weak_labels import load_weak_label_set
from holons.errors import HolonsError
from holons.eval.results import format_table, write_results
from holons.finetune.localize.folder import load_localizer
from holons.finetune.localize.predict import predict_maps
from holons.finetune.metrics import BOX_IOU_THRESHOLDS, auc, box_iou, max_box_acc_v2, region_boxes

__all__ = ["pointing_game_hits", "top1_localization_hits", "evaluate_localizer", "run_localize_evaluation",
           "format_localize"]


def pointing_game_hits(maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray], *,
                       tolerance: float = 0.0) -> np.ndarray:
    """Per image: whether the peak of its map (first arg-max pixel, at its centre ``(col, row)``) lies in
    one of its boxes grown by ``tolerance`` pixels on every side."""
    hits = []
    for m, gt in zip(maps, boxes, strict=True):
        row, col = np.unravel_index(int(np.argmax(m)), np.shape(m))
        g = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        hits.append(bool(np.any((g[:, 0] - tolerance <= col) & (col <= g[:, 2] + tolerance)
                                & (g[:, 1] - tolerance <= row) & (row <= g[:, 3] + tolerance))))
    return np.asarray(hits, dtype=bool)


def top1_localization_hits(maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                           correct: Sequence[bool], *, threshold: float, iou: float = 0.5) -> np.ndarray:
    """Per image: the class is ``correct`` and a region of ``map >= threshold`` has a box with IoU at
    least ``iou`` against a ground-truth box."""
    hits = []
    for m, gt, ok in zip(maps, boxes, correct, strict=True):
        found = region_boxes(np.asarray(m) >= threshold)
        best = box_iou(found, gt).max() if len(found) and len(gt) else 0.0
        hits.append(bool(ok) and best >= iou)
    return np.asarray(hits, dtype=bool)


def evaluate_localizer(model: str | Path, data: str | Path, *, split: str | None = None,
                       finding: str | None = None, tolerance: float = 0.0, device: str = "auto",
                       progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """Score the localizer folder ``model`` on ``split`` (default: the set's held-out split) of the set at
    ``data``; returns (summary, one row per scored image)."""
    t0 = time.perf_counter()
    loaded = load_localizer(model)
    recorded = loaded.meta.get("config", {}).get("finding")
    dataset = load_weak_label_set(data, finding or recorded)
    if dataset.classes != loaded.classes:
        raise HolonsError(f"the model's classes {loaded.classes} differ from the data's {dataset.classes}")
    split = split or dataset.held_out_split()
    idx = dataset.indices(split)
    if not len(idx):
        raise HolonsError(f"{data} has no images in split {split!r}")
    labels = dataset.labels[idx]
    prediction = predict_maps(model, [dataset.paths[i] for i in idx], target=labels.tolist(), device=device,
                              progress=progress)
    probabilities = prediction.probabilities
    try:
        class_auc = auc(labels, probabilities)
    except ValueError:  # one class only in this split
        class_auc = float("nan")
    predicted = probabilities.argmax(axis=1)
    scored = [k for k, i in enumerate(idx) if len(dataset.boxes[i])]
    if not scored:
        raise HolonsError(f"no image of split {split!r} of {data} has a ground-truth box")
    maps = [prediction.maps[k] for k in scored]
    boxes = [dataset.boxes[idx[k]] for k in scored]
    box_scores = max_box_acc_v2(maps, boxes)
    pointing = pointing_game_hits(maps, boxes, tolerance=tolerance)
    correct = predicted[scored] == labels[scored]
    top1 = top1_localization_hits(maps, boxes, correct, threshold=box_scores["best_threshold@0.5"])
    items = pd.DataFrame({
        "image": [prediction.names[k] for k in scored], "label": [dataset.classes[labels[k]] for k in scored],
        "predicted": [dataset.classes[predicted[k]] for k in scored], "pointing_hit": pointing,
        "top1_loc_hit": top1,
        "box_iou": [float(box_iou(prediction.boxes[k], b).max()) if np.all(np.isfinite(prediction.boxes[k]))
                    else 0.0 for k, b in zip(scored, boxes, strict=True)],
    })
    summary = {
        "protocol": "localize", "model": str(model), "method": loaded.meta["method"], "data": str(data),
        "dataset": dataset.name, "split": split, "n_images": int(len(idx)), "n_scored": len(scored),
        "iou_thresholds": list(BOX_IOU_THRESHOLDS), **box_scores,
        "pointing_game": float(pointing.mean()), "top1_localization": float(top1.mean()),
        "classification_auc": class_auc, "accuracy": float((predicted == labels).mean()),
        "tolerance_px": tolerance, "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return summary, items


def run_localize_evaluation(model: str | Path, data: str | Path, out: str | Path, **settings) -> dict:
    """:func:`evaluate_localizer`, written to ``OUT/results.json`` and ``OUT/items.csv``; returns the
    summary."""
    summary, items = evaluate_localizer(model, data, **settings)
    write_results(out, summary, {"items": items})
    return summary


def format_localize(summaries: Sequence[dict]) -> str:
    """One row per evaluated model: MaxBoxAccV2 and BoxAcc at each IoU, pointing game, top-1 loc, AUC (%)."""
    rows = [{"method": s["method"], "MaxBoxAccV2 %": 100 * s["max_box_acc_v2"],
             **{f"IoU {d:g} %": 100 * s[f"box_acc@{d:g}"] for d in s["iou_thresholds"]},
             "pointing %": 100 * s["pointing_game"], "top-1 loc %": 100 * s["top1_localization"],
             "AUC": s["classification_auc"]} for s in summaries]
    ious = [f"IoU {d:g} %" for d in BOX_IOU_THRESHOLDS]
    return format_table(rows, ["method", "MaxBoxAccV2 %", *ious, "pointing %", "top-1 loc %", "AUC"])
