"""Classification transfer: kNN, linear probe and fine-tuning at label fractions.

Data sets (detected from the folder):

- phantoms (``image_table.csv`` with ``cardiomegaly`` and ``nodule``): two binary findings
  (multi-label); train = split ``train``, test = ``test`` (else ``val``).
- the covid set (``metadata.csv`` with ``finding`` and ``patientid``): frontal views only, one
  single-label task ``covid19`` (COVID-19 in ``finding`` vs any other finding); train / test split
  by patient (keyed hash of the patient id, seeded; ``holons.data.splits``).

Protocols, each at every label fraction (the labelled subset of the train split, drawn per seed,
with at least one example of every class where the split has one):

- ``knn``: cosine similarity of pooled embeddings, the k = 20 nearest, votes weighted by
  exp(sim / T) with T = 0.07 (as in DINO's kNN evaluation);
- ``linear``: scikit-learn logistic regression on standardized pooled embeddings;
- ``finetune``: the backbone plus a linear head trained end to end for a few steps.

Metrics per task: AUC with a seeded bootstrap 95 % interval over test images; accuracy and
macro-F1 for single-label sets.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from holons.data.image import UnreadableImage
from holons.data.readers import read_image
from holons.data.splits import patient_splits
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
from holons.eval.landmark_data import load_annotated, resize_image
from holons.eval.metrics import accuracy, auc_with_ci, macro_f1
from holons.eval.results import format_table, write_results
from holons.ssl.backbone import Backbone

__all__ = [
    "PROTOCOLS", "ClassificationSet", "load_classification_set", "label_subset", "knn_scores",
    "linear_probe_scores", "finetune_scores", "task_metrics", "evaluate_classification",
    "run_classification", "format_classification",
]

PROTOCOLS = ("knn", "linear", "finetune")
PHANTOM_FINDINGS = ("cardiomegaly", "nodule")


@dataclass
class ClassificationSet:
    """Images with labels: ``labels`` is ``N x T`` class indices (one column per task)."""

    name: str
    paths: list[Path]
    labels: np.ndarray
    tasks: list[str]
    class_names: list[list[str]]
    split: np.ndarray  # "train" | "test" per image
    single_label: bool

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_classification_set(
    root: str | Path, *, seed: int = 0, test_fraction: float = 0.3
) -> ClassificationSet:
    """Open a phantom set or the covid set at ``root`` (see the module docstring)."""
    root = Path(root)
    table = root / "image_table.csv"
    if table.is_file() and set(PHANTOM_FINDINGS) <= set(pd.read_csv(table, nrows=0).columns):
        data = load_annotated(root)
        test = data.default_eval_split()
        t = data.table[data.table["split"].isin(["train", test])]
        labels = np.stack([t[f].astype(int).to_numpy() for f in PHANTOM_FINDINGS], axis=1)
        return ClassificationSet(
            name="phantoms", paths=[data.image_path(i) for i in t["id"]], labels=labels,
            tasks=list(PHANTOM_FINDINGS), class_names=[["absent", "present"]] * len(PHANTOM_FINDINGS),
            split=np.where(t["split"].to_numpy() == "train", "train", "test"), single_label=False,
        )
    meta = root / "metadata.csv"
    if meta.is_file():
        m = pd.read_csv(meta, dtype=str, keep_default_na=False)
        missing = {"finding", "patientid", "filename"} - set(m.columns)
        if missing:
            raise HolonsError(f"{meta} lacks columns {sorted(missing)}")
        if "view" in m.columns:
            m = m[m["view"].str.upper() != "L"]  # frontal views only
        folder = root / "images"
        m = m[[(folder / f).is_file() for f in m["filename"]]]
        if m.empty:
            raise HolonsError(f"no images of {meta} found under {folder}")
        covid = m["finding"].str.contains("COVID-19", regex=False).astype(int).to_numpy()
        split = patient_splits(m["patientid"].tolist(), (1 - test_fraction, 0.0, test_fraction), seed=seed)
        return ClassificationSet(
            name="covid", paths=[folder / f for f in m["filename"]], labels=covid[:, None], tasks=["covid19"],
            class_names=[["other", "COVID-19"]], split=np.where(split == "train", "train", "test"),
            single_label=True,
        )
    raise HolonsError(f"{root} is neither a phantom set (image_table.csv with cardiomegaly, nodule) "
                      "nor a finding-labelled set (metadata.csv with finding, patientid, filename)")


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a ``fraction`` of the rows of ``labels`` (``N x T``), seeded, topped up so that every
    class present in every task has at least one example."""
    if not 0.0 < fraction <= 1.0:
        raise HolonsError(f"label fraction must be within (0, 1], got {fraction}")
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    take = list(order[: max(1, math.ceil(fraction * n))])
    for t in range(labels.shape[1]):
        for c in np.unique(labels[:, t]):
            if not np.any(labels[take, t] == c):
                take.append(next(i for i in order if labels[i, t] == c))
    return np.sort(np.asarray(take))


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


def finetune_scores(backbone: Backbone, train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor,
                    num_classes: Sequence[int], *, steps: int = 100, batch_size: int = 16, lr: float = 1e-3,
                    encoder_lr: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu",
                    ) -> list[np.ndarray]:
    """Fine-tune a copy of ``backbone`` with one linear head per task (cross-entropy summed over tasks);
    return per-task class probabilities on ``test_x``."""
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone).to(device)
    head = nn.Linear(backbone.embed_dim, int(sum(num_classes))).to(device)
    opt = torch.optim.AdamW([{"params": head.parameters(), "lr": lr},
                             {"params": model.parameters(), "lr": encoder_lr}], weight_decay=1e-4)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    bounds = np.cumsum([0, *num_classes])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
        logits = head(model(train_x[idx].to(device)))
        loss = sum(F.cross_entropy(logits[:, bounds[t]:bounds[t + 1]], y[idx, t].to(device))
                   for t in range(len(num_classes)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([head(model(test_x[i:i + batch_size].to(device))).cpu()
                            for i in range(0, len(test_x), batch_size)])
    return [logits[:, bounds[t]:bounds[t + 1]].softmax(dim=1).numpy().astype(np.float64)
            for t in range(len(num_classes))]


def task_metrics(y_true: np.ndarray, scores: np.ndarray, *, single_label: bool, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """AUC with bootstrap interval; accuracy and macro-F1 (over all classes) when ``single_label``."""
    out = auc_with_ci(y_true, scores, n_boot=n_boot, seed=seed)
    if single_label:
        pred = scores.argmax(axis=1)
        out["accuracy"] = accuracy(y_true, pred)
        out["macro_f1"] = macro_f1(y_true, pred, labels=list(range(scores.shape[1])))
    return out


def _read_images(paths: Sequence[Path], size: int, show: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images resized to ``size``; unreadable files are skipped (their mask entry is False)."""
    images, ok = [], []
    for p in tqdm(paths, desc="read images", disable=not show):
        try:
            images.append(resize_image(read_image(p).pixels, size))
            ok.append(True)
        except UnreadableImage:
            ok.append(False)
    return np.stack(images) if images else np.zeros((0, size, size), np.float32), np.asarray(ok)


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
    dev = resolve_device(device if device is None else str(device))
    show = progress_enabled(progress)
    pixels, ok = _read_images(data.paths, size, show)
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
            per_task = finetune_scores(backbone, x[sub], labels[sub], x[test], n_classes, steps=steps,
                                       batch_size=batch_size, seed=seed, device=dev)
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
        "size": size, "fractions": list(fractions), "seeds": list(seeds), "protocols": list(protocols),
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
