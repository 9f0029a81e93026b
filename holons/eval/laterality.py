"""Laterality probe: can a linear classifier on frozen pooled features tell a radiograph from its mirror?

Chest anatomy is not left-right symmetric (heart, aortic knob, gastric bubble), so a model that
keeps laterality should separate an image from its horizontal mirror image. The probe is balanced by
construction: every image enters twice, as itself (label 1) and mirrored (label 0). Images are split
by patient (by image where the set has no patient id), so an image and its mirror are always on the
same side of the split. A scikit-learn logistic regression on standardized pooled embeddings
(:func:`holons.eval.classify.linear_probe_scores`) is fitted on the training pairs and scored on the
test pairs.

Reported: accuracy (threshold 1/2), AUC with a seeded bootstrap 95 % interval that resamples test
*images* (each with its mirror, so the pair never splits), and the pair accuracy (the share of test
images whose original scores above its own mirror). Chance is 0.5 for all three.

Data (detected from the folder): an annotated set (``image_table.csv``: built-in phantoms, JSRT),
a ``metadata.csv`` set with ``filename`` (frontal views; grouped by ``patientid``), or any folder of
images (every file ``detect_format`` knows). Images are prepared with the one preprocessing contract
(:class:`holons.data.preprocess.Preprocessing`): an exported foundation's own, else letterbox at
``size``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from holons.data.annotated import DataLayoutError, load_annotated
from holons.data.formats import detect_format
from holons.data.image import UnreadableImage
from holons.data.preprocess import Preprocessing
from holons.data.splits import patient_splits
from holons.errors import HolonsError
from holons.eval.classify import linear_probe_scores
from holons.eval.features import (
    RANDOM,
    describe_weights,
    input_stats,
    load_backbone,
    pooled_embeddings,
    progress_enabled,
    resolve_device,
    to_input,
)
from holons.eval.results import format_table, write_results
from holons.finetune.metrics import accuracy, auc, bootstrap_ci
from holons.ssl.backbone import Backbone

__all__ = ["LateralitySet", "load_laterality_set", "laterality_preprocessing", "evaluate_laterality",
           "run_laterality", "format_laterality"]


@dataclasses.dataclass
class LateralitySet:
    """Image files with the group (patient) each belongs to; the split is drawn over the groups."""

    name: str
    paths: list[Path]
    groups: list[str]


def load_laterality_set(root: str | Path) -> LateralitySet:
    """The images of an annotated set, a ``metadata.csv`` set or a plain folder (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise HolonsError(f"{root} is not a folder")
    try:
        data = load_annotated(root)
    except DataLayoutError:
        data = None
    if data is not None:
        ids = data.ids()
        return LateralitySet("annotated", [data.image_path(i) for i in ids], [data.patient(i) for i in ids])
    meta = root / "metadata.csv"
    if meta.is_file():
        m = pd.read_csv(meta, dtype=str, keep_default_na=False)
        if "filename" not in m.columns:
            raise HolonsError(f"{meta} has no filename column")
        if "view" in m.columns:
            m = m[m["view"].str.upper() != "L"]  # frontal views only: a lateral view has no left and right
        files = [root / "images" / f for f in m["filename"]]
        keep = [f.is_file() for f in files]
        groups = m["patientid"] if "patientid" in m.columns else m["filename"]
        return LateralitySet("metadata", [f for f, k in zip(files, keep, strict=True) if k],
                             [str(g) for g, k in zip(groups, keep, strict=True) if k])
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and detect_format(p) is not None)
    if not files:
        raise HolonsError(f"no images under {root} (nor image_table.csv or metadata.csv)")
    return LateralitySet("folder", files, [str(p.relative_to(root)) for p in files])


def laterality_preprocessing(weights: str | Path, size: int | None) -> Preprocessing:
    """An exported foundation's recorded preprocessing (``size`` replacing its side when given), else
    the default contract at ``size`` (224 when None)."""
    if str(weights) != RANDOM and Path(weights).is_dir():
        from holons.ssl.export import foundation_preprocessing

        prep = foundation_preprocessing(weights)
        return prep if size is None else dataclasses.replace(prep, size=int(size))
    return Preprocessing(size=int(size or 224))


def _pair_statistics(y: np.ndarray, s: np.ndarray) -> float:
    return auc(y.ravel(), s.ravel())


def evaluate_laterality(backbone: Backbone, data: LateralitySet, preprocessing: Preprocessing, *,
                        seed: int = 0, test_fraction: float = 0.3, n_boot: int = 1000, batch_size: int = 16,
                        device: str | torch.device | None = None,
                        progress: bool | None = None) -> tuple[dict, pd.DataFrame]:
    """Fit the probe on the training images and their mirrors, score the test pairs; returns
    (summary, one row per test image with the probe's score of the image and of its mirror)."""
    t0 = time.perf_counter()
    show = progress_enabled(progress)
    pixels, keep = [], []
    for i, path in enumerate(tqdm(data.paths, desc="read images", disable=not show)):
        try:
            pixels.append(preprocessing.read(path)[0])
            keep.append(i)
        except UnreadableImage:
            continue
    groups = [data.groups[i] for i in keep]
    split = patient_splits(groups, (1.0 - test_fraction, 0.0, test_fraction), seed=seed)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(train) < 2 or len(test) < 1:
        raise HolonsError(f"the laterality probe needs >= 2 training and >= 1 test images; the split of "
                          f"{len(keep)} readable images by patient gave {len(train)} and {len(test)}")
    x = to_input(np.stack(pixels), input_stats(backbone))
    dev = resolve_device(device if device is None else str(device))
    emb = pooled_embeddings(backbone, x, batch_size=batch_size, device=dev).numpy()
    mirror = pooled_embeddings(backbone, x.flip(-1), batch_size=batch_size, device=dev).numpy()
    train_x = np.concatenate([emb[train], mirror[train]])
    train_y = np.concatenate([np.ones(len(train), int), np.zeros(len(train), int)])
    test_x = np.concatenate([emb[test], mirror[test]])
    probs = linear_probe_scores(train_x, train_y, test_x, 2, seed=seed)[:, 1]
    s_orig, s_mirror = probs[:len(test)], probs[len(test):]
    pairs_y = np.stack([np.ones(len(test), int), np.zeros(len(test), int)], axis=1)
    pairs_s = np.stack([s_orig, s_mirror], axis=1)
    lo, hi = bootstrap_ci(_pair_statistics, pairs_y, pairs_s, n_boot=n_boot, seed=seed)
    summary = {
        "protocol": "laterality", "dataset": data.name, "preprocessing": preprocessing.to_dict(),
        "seed": seed, "test_fraction": test_fraction, "n_train_images": int(len(train)),
        "n_test_images": int(len(test)), "unreadable": int(len(data.paths) - len(keep)),
        "accuracy": accuracy(pairs_y.ravel(), (pairs_s.ravel() >= 0.5).astype(int)),
        "auc": _pair_statistics(pairs_y, pairs_s), "auc_lo": lo, "auc_hi": hi,
        "pair_accuracy": float(np.mean(s_orig > s_mirror)),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    table = pd.DataFrame({"image": [data.paths[keep[i]].name for i in test],
                          "score_image": s_orig, "score_mirror": s_mirror})
    return summary, table


def format_laterality(summary: dict) -> str:
    """One row: accuracy, AUC [95 % CI], pair accuracy."""
    row = {"weights": summary.get("method", summary.get("weights")), "test images": summary["n_test_images"],
           "accuracy": summary["accuracy"],
           "auc [95% CI]": f"{summary['auc']:.3f} [{summary['auc_lo']:.3f}, {summary['auc_hi']:.3f}]",
           "pair accuracy": summary["pair_accuracy"]}
    return format_table([row], list(row))


def run_laterality(weights: str | Path, data: str | Path, out: str | Path, *, arch: str | None = None,
                   size: int | None = None, **settings) -> dict:
    """Load ``weights``, probe laterality on the images at ``data``, write ``OUT/results.json`` and
    ``OUT/pairs.csv``; return the summary."""
    backbone = load_backbone(weights, arch)
    summary, table = evaluate_laterality(backbone, load_laterality_set(data),
                                         laterality_preprocessing(weights, size), **settings)
    summary = {**describe_weights(weights, backbone), "data": str(data), **summary}
    write_results(out, summary, {"pairs": table})
    return summary
