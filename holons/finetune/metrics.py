"""Metrics of fine-tuned models' validation and of the evaluation protocols: overlap, landmark error,
PCK, AUC with bootstrap intervals, box localization (MaxBoxAccV2).

All functions take plain arrays and return plain Python numbers or dicts, so results serialize
to JSON directly. Conventions: Dice of two empty masks is 1 (nothing to find, nothing found);
landmark coordinates are (x, y) pixels; PCK is the percentage of points whose error is at most
the radius; confidence intervals are percentile bootstraps over items, seeded. Boxes are
``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel ``i`` spans ``[i - 0.5, i + 0.5]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

__all__ = [
    "dice", "landmark_errors", "pck", "error_summary", "bootstrap_ci", "auc", "auc_with_ci",
    "accuracy", "macro_f1", "box_iou", "region_boxes", "box_accuracy_curve", "max_box_acc_v2",
]

BOX_IOU_THRESHOLDS = (0.3, 0.5, 0.7)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap 2|P∩T| / (|P| + |T|) of two binary masks of the same shape (1.0 when both are empty)."""
    p = np.asarray(pred).astype(bool)
    t = np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def landmark_errors(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Euclidean distance per point between two ``N x 2`` arrays of (x, y) coordinates."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"expected two N x 2 arrays of the same shape, got {p.shape} and {t.shape}")
    return np.hypot(p[:, 0] - t[:, 0], p[:, 1] - t[:, 1])


def pck(errors: np.ndarray, radii: Sequence[float]) -> dict[str, float]:
    """Percentage of correct keypoints: ``{"pck@r": % of errors <= r}`` for each radius ``r``."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        return {f"pck@{_fmt_radius(r)}": float("nan") for r in radii}
    return {f"pck@{_fmt_radius(r)}": float(100.0 * np.mean(e <= r)) for r in radii}


def error_summary(errors: np.ndarray, radii: Sequence[float]) -> dict[str, float]:
    """Mean and median error, PCK at ``radii`` and the number of points."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    out = {
        "mean_px": float(e.mean()) if e.size else float("nan"),
        "median_px": float(np.median(e)) if e.size else float("nan"),
    }
    out.update(pck(e, radii))
    out["n_points"] = int(e.size)
    return out


def _fmt_radius(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else str(r)


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling items (rows) with replacement.

    Resamples on which the statistic is undefined (it raises ``ValueError``, e.g. AUC with a
    single class) are skipped. Returns ``(nan, nan)`` when none is defined.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("all arrays must have the same number of items")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            values.append(float(statistic(*(a[idx] for a in arrays))))
        except ValueError:
            continue
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC. Binary: ``scores`` is the positive-class score (N) or class scores (N x 2).
    Multi-class single-label: ``scores`` is N x C (rows are probabilities), macro one-vs-rest."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("AUC needs at least two classes among the labels")
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        return float(roc_auc_score(y, s))
    # One-vs-rest over the classes present (a class absent from the test labels has no AUC).
    return float(np.mean([roc_auc_score(y == c, s[:, int(c)]) for c in present]))


def auc_with_ci(
    y_true: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """AUC with a seeded percentile-bootstrap interval: ``{"auc", "auc_lo", "auc_hi"}`` (NaN if undefined)."""
    try:
        point = auc(y_true, scores)
    except ValueError:
        return {"auc": float("nan"), "auc_lo": float("nan"), "auc_hi": float("nan")}
    lo, hi = bootstrap_ci(auc, np.asarray(y_true), np.asarray(scores), n_boot=n_boot,
                          confidence=confidence, seed=seed)
    return {"auc": point, "auc_lo": lo, "auc_hi": hi}


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of items whose predicted class equals the true class."""
    return float(accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """F1 averaged over classes with equal weight (``labels`` fixes the class list; absent ones count 0)."""
    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), labels=labels, average="macro",
                          zero_division=0))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (``N x 4``) with every box in ``b`` (``M x 4``): ``N x M``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def region_boxes(mask: np.ndarray) -> np.ndarray:
    """The bounding box of every 8-connected region of a bool ``H x W`` mask (``K x 4``; K = 0 if empty)."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros((0, 4))
    return np.array([[sx.start - 0.5, sy.start - 0.5, sx.stop - 0.5, sy.stop - 0.5]
                     for sy, sx in ndimage.find_objects(labels)], dtype=np.float64)


def box_accuracy_curve(
    maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray], *, thresholds: Sequence[float] | None = None,
    iou_thresholds: Sequence[float] = BOX_IOU_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """BoxAcc at every (map threshold, IoU threshold): the share of images where some region of
    ``map >= threshold`` has a box overlapping some ground-truth box by at least the IoU threshold.

    ``maps`` are localization maps scaled to [0, 1] per image; ``boxes`` the ground-truth boxes per image
    (``K x 4``). Returns (thresholds, accuracy ``T x len(iou_thresholds)``)."""
    if len(maps) != len(boxes) or not len(maps):
        raise ValueError(f"need one box set per map and at least one image, got {len(maps)} and {len(boxes)}")
    taus = np.arange(0.0, 1.0, 0.01) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    deltas = np.asarray(iou_thresholds, dtype=np.float64)
    hits = np.zeros((len(taus), len(deltas)))
    for cam, gt in zip(maps, boxes, strict=True):
        for t, tau in enumerate(taus):
            found = region_boxes(np.asarray(cam) >= tau)
            best = box_iou(found, gt).max() if len(found) and len(gt) else 0.0
            hits[t] += best >= deltas
    return taus, hits / len(maps)


def max_box_acc_v2(
    maps: Sequence[np.ndarray], boxes: Sequence[np.ndarray], *, thresholds: Sequence[float] | None = None,
    iou_thresholds: Sequence[float] = BOX_IOU_THRESHOLDS,
) -> dict[str, float]:
    """MaxBoxAccV2 (Choe et al., CVPR 2020): for each IoU threshold the best BoxAcc over map thresholds
    (all regions' boxes considered), then their mean. Returns ``{"max_box_acc_v2", "box_acc@<iou>",
    "best_threshold@<iou>"}``; accuracies as fractions."""
    taus, acc = box_accuracy_curve(maps, boxes, thresholds=thresholds, iou_thresholds=iou_thresholds)
    out: dict[str, float] = {"max_box_acc_v2": float(acc.max(axis=0).mean())}
    for j, delta in enumerate(iou_thresholds):
        out[f"box_acc@{delta:g}"] = float(acc[:, j].max())
        out[f"best_threshold@{delta:g}"] = float(taus[int(acc[:, j].argmax())])
    return out
