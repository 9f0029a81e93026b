"""Classification transfer: kNN, linear probe and fine-tuning at label fractions.

Data sets: ``holons.data.labelled`` (phantoms, the covid set, a label manifest with train / test
splits). Images go through the preprocessing contract (``holons.data.preprocess``, letterbox at
``size``); unreadable ones are left out and counted.

Protocols, each at every label fraction (the labelled subset of the train split, drawn per seed,
with at least one example of every class where the split has one):

- ``knn``: cosine similarity of pooled embeddings, the k = 20 nearest, votes weighted by
  exp(sim / T) with T = 0.07 (as in DINO's kNN evaluation);
- ``linear``: scikit-learn logistic regression on standardized pooled embeddings;
- ``finetune``: the backbone plus a linear head trained end to end for a few steps
  (``holons.finetune.classifier.train_classifier``).

Metrics per task: AUC with a seeded bootstrap 95 % interval over test images; accuracy and
macro-F1 for single-label sets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from holons.data.labelled import ClassificationSet, label_subset, load_classification_set
from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.eval.features import (
    describe_weights,
    input_stats,
    load_backbone,
    pooled_embeddings,
    progress_enabled,
    resolve_device,
    to_input,
)
from holons.eval.results import format_table, write_results
from holons.finetune.classifier import class_probabilities, train_classifier
from holons.finetune.inputs import read_canvases
from holons.finetune.metrics import accuracy, auc_with_ci, macro_f1
from holons.ssl.backbone import Backbone

__all__ = [
    "PROTOCOLS", "knn_scores", "linear_probe_scores", "task_metrics", "evaluate_classification",
    "run_classification", "format_classification",
]

PROTOCOLS = ("knn", "linear", "finetune")


def knn_scores(train_emb: np.ndarray, train_y: np.ndarray, test_emb: np.ndarray, num_classes: int, *,
               k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """Class scores ``N_test x C`` (rows sum to 1) from the ``k`` most cosine-similar training items,
    each voting for its class with weight exp(similarity / temperature)."""
    a = F.normalize(torch.as_tensor(np.asarray(train_emb), dtype=torch.float32), dim=1)
    b = F.normalize(torch.as_tensor(np.asarray(test_emb), dtype=torch.float32), dim=1)
    sim = b @ a.T
    top, idx = sim.topk(min(k, a.shape[0]), dim=1)
    weights = (top / temperature).exp()
    onehot = F.one_hot(torch.as_tensor(np.asarray(train_y), dtype=torch.long)[idx], num_classes).float()
    votes = (onehot * weights[..., None]).sum(dim=1)
    return (votes / votes.sum(dim=1, keepdim=True)).numpy().astype(np.float64)


def linear_probe_scores(train_emb: np.ndarray, train_y: np.ndarray, test_emb: np.ndarray, num_classes: int, *,
                        c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Class probabilities ``N_test x C`` of a logistic regression on standardized embeddings."""
    present = np.unique(train_y)
    out = np.zeros((len(test_emb), num_classes))
    if len(present) < 2:  # one class only: it gets all the probability
        out[:, int(present[0])] = 1.0
        return out
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(np.asarray(train_emb), np.asarray(train_y))
    out[:, clf.classes_.astype(int)] = clf.predict_proba(np.asarray(test_emb))
    return out


def task_metrics(y_true: np.ndarray, scores: np.ndarray, *, single_label: bool, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """AUC with bootstrap interval; accuracy and macro-F1 (over all classes) when ``single_label``."""
    out = auc_with_ci(y_true, scores, n_boot=n_boot, seed=seed)
    if single_label:
        pred = scores.argmax(axis=1)
        out["accuracy"] = accuracy(y_true, pred)
        out["macro_f1"] = macro_f1(y_true, pred, labels=list(range(scores.shape[1])))
    return out


def evaluate_classification(
    backbone: Backbone,
    data: ClassificationSet,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0,),
    size: int = 128,
    k: int = 20,
    temperature: float = 0.07,
    steps: int = 100,
    batch_size: int = 16,
    n_boot: int = 1000,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Every protocol at every label fraction and seed; returns (summary, one row per run and task)."""
    t0 = time.perf_counter()
    for p in protocols:
        if p not in PROTOCOLS:
            raise HolonsError(f"unknown protocol {p!r}; choose from {PROTOCOLS}")
    dev = resolve_device(device)
    show = progress_enabled(progress)
    pixels, geometries = read_canvases(data.paths, Preprocessing(size=size), show=show)
    ok = np.asarray([g is not None for g in geometries], dtype=bool)
    pixels = pixels[ok]
    labels, split = data.labels[ok], data.split[ok]
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(train) == 0 or len(test) == 0:
        raise HolonsError(f"classification needs train and test images; found {len(train)} and {len(test)}")
    x = to_input(pixels, input_stats(backbone))
    emb = pooled_embeddings(backbone, x, batch_size=batch_size, device=dev).numpy() \
        if {"knn", "linear"} & set(protocols) else None
    n_classes = [len(c) for c in data.class_names]

    runs = [(p, f, s) for p in protocols for f in fractions for s in seeds]
    rows = []
    for protocol, fraction, seed in tqdm(runs, desc="classification runs", disable=not show):
        sub = train[label_subset(labels[train], fraction, seed)]
        if protocol == "finetune":
            model = train_classifier(backbone, x[sub], labels[sub], n_classes, steps=steps,
                                     batch_size=batch_size,
                                     seed=seed, device=dev)
            per_task = class_probabilities(model, x[test], batch_size=batch_size, device=dev)
        elif protocol == "knn":
            per_task = [knn_scores(emb[sub], labels[sub, t], emb[test], n_classes[t], k=k,
                                   temperature=temperature) for t in range(len(n_classes))]
        else:
            per_task = [linear_probe_scores(emb[sub], labels[sub, t], emb[test], n_classes[t], seed=seed)
                        for t in range(len(n_classes))]
        for t, task in enumerate(data.tasks):
            m = task_metrics(labels[test, t], per_task[t], single_label=data.single_label, n_boot=n_boot,
                             seed=seed)
            rows.append({"protocol": protocol, "fraction": fraction, "seed": seed, "task": task,
                         "n_train": len(sub), "n_test": len(test), **m})
    table = pd.DataFrame(rows)
    summary = {
        "protocol": "classify", "dataset": data.name, "tasks": data.tasks, "single_label": data.single_label,
        "size": size, "preprocessing": Preprocessing(size=size).to_dict(), "fractions": list(fractions),
        "seeds": list(seeds), "protocols": list(protocols),
        "n_train": int(len(train)), "n_test": int(len(test)), "unreadable": int((~ok).sum()),
        "knn": {"k": k, "temperature": temperature}, "finetune_steps": steps,
        "results": _summarize(table), "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return summary, table


def _summarize(table: pd.DataFrame) -> dict:
    """{protocol: {fraction: {task: metric means over seeds, auc_std over seeds}}}; the bootstrap bounds
    are averaged over seeds."""
    metrics = [c for c in ("auc", "auc_lo", "auc_hi", "accuracy", "macro_f1") if c in table.columns]
    out: dict = {}
    for (protocol, fraction, task), g in table.groupby(["protocol", "fraction", "task"], sort=False):
        entry = {m: float(g[m].mean()) for m in metrics}
        entry["auc_std"] = float(g["auc"].std(ddof=0))
        entry["n_train"] = int(g["n_train"].iloc[0])
        out.setdefault(protocol, {}).setdefault(f"{fraction:g}", {})[task] = entry
    return out


def format_classification(summary: dict) -> str:
    """A short table: AUC [95 % CI] (and accuracy / macro-F1) per protocol, fraction and task."""
    rows = []
    for protocol, by_f in summary["results"].items():
        for fraction, by_task in by_f.items():
            for task, m in by_task.items():
                finite = all(isinstance(m.get(k), float) and math.isfinite(m[k])
                             for k in ("auc", "auc_lo", "auc_hi"))
                ci = f"{m['auc']:.3f} [{m['auc_lo']:.3f}, {m['auc_hi']:.3f}]" if finite else "-"
                rows.append({"protocol": protocol, "fraction": fraction, "task": task,
                             "n_train": m["n_train"], "auc [95% CI]": ci, "accuracy": m.get("accuracy"),
                             "macro_f1": m.get("macro_f1")})
    cols = ["protocol", "fraction", "task", "n_train", "auc [95% CI]"]
    if summary["single_label"]:
        cols += ["accuracy", "macro_f1"]
    return format_table(rows, cols)


def run_classification(weights: str | Path, data: str | Path, out: str | Path, *, arch: str | None = None,
                       split_seed: int = 0, test_fraction: float = 0.3, **settings) -> dict:
    """Load ``weights``, run the protocols on the set at ``data``, write ``OUT/results.json`` and
    ``OUT/runs.csv``; return the summary."""
    backbone = load_backbone(weights, arch)
    dataset = load_classification_set(data, seed=split_seed, test_fraction=test_fraction)
    summary, table = evaluate_classification(backbone, dataset, **settings)
    summary = {**describe_weights(weights, backbone), "data": str(data), **summary}
    write_results(out, summary, {"runs": table})
    return summary
