"""Test-split metrics of a karyotype model: per chromosome, per case (with each dispatch), confusion.

Type and dispatch metrics are measured on the images as stored, through the same inference path
(:func:`~holons.finetune.karyotype.inference.predict_dataset`, the model's head and test-time flips)
and the same :func:`label_metrics` that ``karyotype predict`` uses on a labelled manifest, so
predict on a run's own test images reproduces these numbers.

Polarity protocol: stored images are mostly upright, so for ``polarity_accuracy`` each test image
is flipped upside down with probability 1/2 (a generator seeded by ``seed``; the polarity label
swaps) in a second pass.

With ``refined`` (a learned per-cell dispatcher's refined probabilities, see
:func:`~holons.finetune.karyotype.learned_dispatch.refined_probabilities`), :func:`label_metrics`
also reports the learned methods (``*_learned``, ``*_learned_then_optimal``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from holons.files import atomic_write
from holons.finetune.karyotype.data import CLASS_NAMES, NUM_TYPES, KaryotypeDataset
from holons.finetune.karyotype.dispatch import LEARNED_METHODS, METHODS, dispatch_case
from holons.finetune.karyotype.inference import predict_dataset


def per_case_scores(table: pd.DataFrame, probs: np.ndarray, method: str,
                    refined: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dispatched labels per row and each case's fraction of correct types (one entry per case);
    ``refined``: the learned dispatcher's refined probabilities (rows as ``probs``), for the learned
    methods."""
    labels = np.empty(len(table), dtype=int)
    fractions = []
    for _, idx in table.groupby("case_id", sort=True).indices.items():
        labels[idx] = dispatch_case(probs[idx], method,
                                    refined=None if refined is None else refined[idx]).labels
        fractions.append(float((labels[idx] == table["label"].to_numpy()[idx]).mean()))
    return labels, np.asarray(fractions)


def confusion_png(true: np.ndarray, pred: np.ndarray, path: Path, title: str = "") -> np.ndarray:
    """Row-normalised 24 x 24 confusion matrix as a small PNG; returns the count matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(true, pred, labels=np.arange(NUM_TYPES))
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=100)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(NUM_TYPES), CLASS_NAMES, fontsize=6)
    ax.set_yticks(range(NUM_TYPES), CLASS_NAMES, fontsize=6)
    ax.set_xlabel("predicted type")
    ax.set_ylabel("true type")
    if title:
        ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return counts


def label_metrics(table: pd.DataFrame, probs: np.ndarray, polarity_probs: np.ndarray,
                  polarity: np.ndarray | None = None, refined: np.ndarray | None = None
                  ) -> tuple[dict, pd.DataFrame]:
    """Metrics of type probabilities against ``table["label"]`` (and of polarity probabilities
    against ``polarity`` where known): accuracy, macro F1, and per dispatch method the per-case
    accuracy, the share of fully correct cases and the dispatched per-chromosome accuracy (the
    rule-based methods always, the learned ones when ``refined`` is given). Also returns the
    per-chromosome frame (``path, case_id, label, pred_label, ... dispatched_<method>``).
    """
    from sklearn.metrics import f1_score

    true = table["label"].to_numpy()
    pred = probs.argmax(1)
    summary = {
        "test_chromosomes": int(len(table)), "test_cases": int(table["case_id"].nunique()),
        "test_groups": int(table["group"].nunique()) if "group" in table else None,
        "type_accuracy": float((pred == true).mean()),
        "macro_f1": float(f1_score(true, pred, average="macro", labels=np.unique(true))),
    }
    frame = table[["path", "case_id", "label"]].copy()
    frame["pred_label"] = pred
    frame["p_top"] = probs.max(1)
    frame["pred_polarity"] = polarity_probs.argmax(1)
    if polarity is not None:
        known = polarity >= 0
        frame["true_polarity"] = polarity
        summary["polarity_accuracy"] = (float((polarity_probs.argmax(1)[known] == polarity[known]).mean())
                                        if known.any() else None)
    for method in METHODS + (LEARNED_METHODS if refined is not None else ()):
        labels, fractions = per_case_scores(table, probs, method, refined)
        summary[f"case_accuracy_{method}"] = float(fractions.mean())
        summary[f"cases_fully_correct_{method}"] = float((fractions == 1.0).mean())
        summary[f"type_accuracy_{method}"] = float((labels == true).mean())
        frame[f"dispatched_{method}"] = labels
    return summary, frame


def write_metrics(summary: dict, frame: pd.DataFrame, out_dir: Path, name: str = "summary.json") -> dict:
    """``confusion.png`` of ``frame`` and ``summary`` as the JSON ``name`` in ``out_dir``; returns the
    summary with the confusion counts."""
    true, pred = frame["label"].to_numpy(), frame["pred_label"].to_numpy()
    counts = confusion_png(true, pred, out_dir / "confusion.png",
                           f"type accuracy {summary['type_accuracy']:.3f} ({len(frame)} chromosomes)")
    with atomic_write(out_dir / name, "w") as f:
        json.dump(summary, f, indent=2)
    return {**summary, "confusion": counts.tolist()}


def evaluate_split(model, dataset: KaryotypeDataset, head: str, device, out_dir: str | Path, *,
                   dispatch: str = "optimal", seed: int = 0, batch_size: int = 256,
                   hflip: bool = False, vflip: bool = False) -> dict:
    """Metrics on ``dataset`` (see module doc); writes predictions.csv, confusion.png and summary.json
    to ``out_dir``; ``hflip`` / ``vflip``: average each prediction with that of the mirror /
    upside-down image."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(dataset) == 0:
        return {"test_chromosomes": 0}
    types, _ = predict_dataset(model, dataset, head, device, batch_size, hflip=hflip, vflip=vflip)
    flips = torch.rand(len(dataset), generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    _, pols = predict_dataset(model, dataset, head, device, batch_size, flips, hflip=hflip, vflip=vflip)
    polarity = torch.where(flips & (dataset.polarity >= 0), 1 - dataset.polarity, dataset.polarity).numpy()
    summary, frame = label_metrics(dataset.table, types.numpy().astype(np.float64), pols.numpy(), polarity)
    summary = {"head": head, **summary}
    with atomic_write(out_dir / "predictions.csv", "w") as f:
        frame.to_csv(f, index=False)
    return write_metrics(summary, frame, out_dir)
