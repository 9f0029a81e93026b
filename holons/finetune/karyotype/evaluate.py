"""Test-split metrics of a karyotype model: per chromosome, per case (with each dispatch), confusion.

Polarity protocol: stored images are mostly upright, so each test image is flipped upside down
with probability 1/2 (a generator seeded by ``seed``; the polarity label swaps) before prediction.
Type accuracy is measured on the same flipped images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from holons.files import atomic_write
from holons.finetune.karyotype.data import CLASS_NAMES, NUM_TYPES, KaryotypeDataset
from holons.finetune.karyotype.dispatch import METHODS, dispatch_case


def per_case_scores(table: pd.DataFrame, probs: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Dispatched labels per row and each case's fraction of correct types (one entry per case)."""
    labels = np.empty(len(table), dtype=int)
    fractions = []
    for _, idx in table.groupby("case_id", sort=True).indices.items():
        labels[idx] = dispatch_case(probs[idx], method).labels
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


def evaluate_split(model, dataset: KaryotypeDataset, head: str, device, out_dir: str | Path, *,
                   dispatch: str = "optimal", seed: int = 0, batch_size: int = 256,
                   hflip: bool = False, vflip: bool = False) -> dict:
    """Metrics on ``dataset`` (see module doc); writes predictions.csv and confusion.png to ``out_dir``;
    ``hflip`` / ``vflip``: average each prediction with that of the mirror / upside-down image."""
    from sklearn.metrics import f1_score

    from holons.finetune.karyotype.train import predict_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(dataset) == 0:
        return {"test_chromosomes": 0}
    flips = torch.rand(len(dataset), generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    types, pols = predict_dataset(model, dataset, head, device, batch_size, flips, hflip=hflip, vflip=vflip)
    probs = types.numpy().astype(np.float64)
    true = dataset.labels.numpy()
    polarity = torch.where(flips & (dataset.polarity >= 0), 1 - dataset.polarity, dataset.polarity).numpy()
    pred = probs.argmax(1)
    pred_pol = pols.numpy().argmax(1)
    known = polarity >= 0
    summary = {
        "head": head, "test_chromosomes": int(len(dataset)),
        "test_cases": int(dataset.table["case_id"].nunique()),
        "test_groups": int(dataset.table["group"].nunique()),
        "type_accuracy": float((pred == true).mean()),
        "polarity_accuracy": float((pred_pol[known] == polarity[known]).mean()) if known.any() else None,
        "macro_f1": float(f1_score(true, pred, average="macro", labels=np.unique(true))),
    }
    frame = dataset.table[["path", "case_id", "label"]].copy()
    frame["true_polarity"] = polarity
    frame["pred_label"] = pred
    frame["pred_polarity"] = pred_pol
    frame["p_top"] = probs.max(1)
    for method in METHODS:
        labels, fractions = per_case_scores(dataset.table, probs, method)
        summary[f"case_accuracy_{method}"] = float(fractions.mean())
        summary[f"cases_fully_correct_{method}"] = float((fractions == 1.0).mean())
        summary[f"type_accuracy_{method}"] = float((labels == true).mean())
        frame[f"dispatched_{method}"] = labels
    counts = confusion_png(true, pred, out_dir / "confusion.png",
                           f"type accuracy {summary['type_accuracy']:.3f} ({len(dataset)} chromosomes)")
    summary["confusion"] = counts.tolist()
    with atomic_write(out_dir / "predictions.csv", "w") as f:
        frame.to_csv(f, index=False)
    with atomic_write(out_dir / "summary.json", "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "confusion"}, f, indent=2)
    return summary
