"""Metrics of the evaluation protocols: overlap, landmark error, PCK, AUC with bootstrap intervals.

All functions take plain arrays and return plain Python numbers or dicts, so results serialize
to JSON directly. Conventions: Dice of two empty masks is 1 (nothing to find, nothing found);
landmark coordinates are (x, y) pixels; PCK is the percentage of points whose error is at most
the radius; confidence intervals are percentile bootstraps over items, seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

__all__ = [
    "dice", "landmark_errors", "pck", "error_summary", "bootstrap_ci", "auc", "auc_with_ci",
    "accuracy", "macro_f1",
]


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
