"""CAM localization: does a finding's class activation map point at the finding? (MaxBoxAccV2)

Protocol (after Choe et al., CVPR 2020, "Evaluating weakly supervised object localization methods
right"), with a frozen backbone:

1. Dense features ``F`` (last stage) of every image on its ``size`` canvas; their global average
   ``g`` is the embedding.
2. Per binary finding, a logistic regression on standardized ``g`` over the train split (its AUC on
   the test split is reported: a map is only as good as the classifier behind it).
3. For every test image with the finding: ``CAM = sum_c (w_c / s_c) F_c`` (``w`` the probe's weights,
   ``s`` the standardizer's scales, so that the logit is the CAM's spatial mean plus a constant),
   upsampled to the image and scaled to [0, 1].
4. MaxBoxAccV2: for every threshold (0, 0.01, ..., 0.99) every connected region of ``CAM >=
   threshold`` gives a box; an image is localized at IoU ``d`` when some box overlaps some
   ground-truth box by ``>= d``; the best share over thresholds, averaged over d = 0.3, 0.5, 0.7.

A reference row comes with it: the same score for the data prior alone (the mean ground-truth box
mask of the train positives, the same map for every test image), so a CAM is credited only for what
it finds beyond where the finding usually sits.

Sets (``holons.data.annotated.load_localization_set``): phantoms (``nodule`` and ``cardiomegaly``;
train = split ``train``, test = ``test``, else ``val``) and JSRT (``nodule``; train =
``hybridgnet_split`` train, test = val). Images go through the preprocessing contract
(``holons.data.preprocess``, letterbox at ``size``); boxes are mapped onto the same canvas.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from holons.data.annotated import LocalizationSet, landmarks_to_canvas, load_localization_set
from holons.data.image import UnreadableImage
from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.eval.features import (
    dense_features,
    describe_weights,
    input_stats,
    load_backbone,
    progress_enabled,
    resolve_device,
    to_input,
)
from holons.eval.results import format_table, write_results
from holons.finetune.metrics import BOX_IOU_THRESHOLDS, auc, max_box_acc_v2
from holons.ssl.backbone import Backbone

__all__ = [
    "class_activation_maps", "evaluate_localization",
    "run_localization", "format_localization",
]

def class_activation_maps(features: torch.Tensor, weights: np.ndarray, size: int) -> np.ndarray:
    """``sum_c weights_c * features_c`` (``features``: ``N x C x h x w``), bilinearly upsampled to
    ``size x size`` and scaled to [0, 1] per image (a constant map becomes all zeros)."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
    cam = torch.einsum("nchw,c->nhw", features.float(), w)[:, None]
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    return ((cam - lo) / torch.where(span > 0, span, torch.ones_like(span))).numpy()


def _box_mask(boxes: np.ndarray, size: int) -> np.ndarray:
    """1 inside any of ``boxes`` (pixel centres), ``size x size``."""
    c = np.arange(size, dtype=np.float64)
    out = np.zeros((size, size), dtype=np.float64)
    for x0, y0, x1, y1 in boxes:
        out[np.ix_((c >= y0) & (c <= y1), (c >= x0) & (c <= x1))] = 1.0
    return out


def evaluate_localization(
    backbone: Backbone,
    data: LocalizationSet,
    *,
    size: int = 256,
    tasks: Sequence[str] | None = None,
    c: float = 1.0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> tuple[dict, pd.DataFrame]:
    """CAM localization of every task; returns (summary, one row per test positive and task)."""
    t0 = time.perf_counter()
    chosen = list(tasks) if tasks else data.tasks
    unknown = sorted(set(chosen) - set(data.tasks))
    if unknown:
        raise HolonsError(f"unknown task(s) {unknown} for the {data.name} set; choose from {data.tasks}")
    dev = resolve_device(device)
    preprocessing = Preprocessing(size=size)
    geometries, resized, kept = [], [], []
    for i, image_id in enumerate(tqdm(data.ids, desc="read images", disable=not progress_enabled(progress))):
        try:
            canvas, geometry = preprocessing.read(data.data.image_path(image_id))
        except UnreadableImage:  # counted in the summary, left out
            continue
        kept.append(i)
        geometries.append(geometry)
        resized.append(canvas)
    kept = np.asarray(kept, dtype=int)
    split, labels = data.split[kept], data.labels[kept]
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if not len(train) or not len(test):
        raise HolonsError(f"CAM localization needs train and test images; found {len(train)} and {len(test)}")
    pixels = np.stack(resized)
    x = to_input(pixels, input_stats(backbone))
    feats = dense_features(backbone, x, batch_size=batch_size, device=dev)
    emb = feats.mean(dim=(2, 3)).numpy().astype(np.float64)

    results, rows = {}, []
    for task in chosen:
        j = data.tasks.index(task)
        y = labels[:, j]
        if len(np.unique(y[train])) < 2:
            raise HolonsError(f"task {task!r}: the train split needs images with and without the finding")
        scaler = StandardScaler().fit(emb[train])
        probe = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(emb[train]), y[train])
        scores = probe.predict_proba(scaler.transform(emb[test]))[:, 1]
        task_auc = auc(y[test], scores) if len(np.unique(y[test])) == 2 else float("nan")
        positives = [i for i in test if y[i]]
        if not positives:
            raise HolonsError(f"task {task!r}: no test image has the finding")

        def scaled_boxes(i: int, task=task) -> np.ndarray:
            """Boxes of kept image ``i`` on the canvas (corners mapped like landmarks)."""
            corners = data.boxes(task, int(kept[i])).reshape(-1, 2)
            return landmarks_to_canvas(corners, geometries[i]).reshape(-1, 4)

        gt = [scaled_boxes(i) for i in positives]
        cams = class_activation_maps(feats[positives], probe.coef_[0] / scaler.scale_, size)
        prior_map = np.mean([_box_mask(scaled_boxes(i), size) for i in train if y[i]], axis=0)
        prior_map = (prior_map - prior_map.min()) / max(float(np.ptp(prior_map)), 1e-12)
        cam_scores = max_box_acc_v2(list(cams), gt)
        prior_scores = max_box_acc_v2([prior_map] * len(gt), gt)
        results[task] = {"probe_auc": task_auc, "n_test_positive": len(positives),
                         "n_train_positive": int(y[train].sum()), **cam_scores,
                         "prior": prior_scores}
        peaks = [np.unravel_index(int(m.argmax()), m.shape) for m in cams]
        for k, i in enumerate(positives):
            box = gt[k][0]
            py, px = peaks[k]
            rows.append({"task": task, "item": int(i), "peak_in_box": bool(box[0] <= px <= box[2]
                                                                        and box[1] <= py <= box[3])})
    table = pd.DataFrame(rows)
    for task in chosen:
        results[task]["peak_in_box"] = float(table.loc[table["task"] == task, "peak_in_box"].mean())
    summary = {
        "protocol": "cam", "dataset": data.name, "size": size,
        "preprocessing": preprocessing.to_dict(), "tasks": chosen,
        "iou_thresholds": list(BOX_IOU_THRESHOLDS), "n_train": int(len(train)), "n_test": int(len(test)),
        "unreadable": int(len(data.ids) - len(kept)),
        "feature_grid": list(feats.shape[-2:]), "results": results,
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return summary, table


def run_localization(weights: str | Path, data: str | Path, out: str | Path, *, arch: str | None = None,
                     seed: int = 0, device: str | None = None, progress: bool | None = None,
                     **settings) -> dict:
    """Load ``weights``, run CAM localization on the set at ``data``, write ``OUT/results.json`` and
    ``OUT/items.csv``; return the summary. ``seed`` seeds a random init (the probe is deterministic)."""
    torch.manual_seed(seed)
    backbone = load_backbone(weights, arch)
    dataset = load_localization_set(data)
    summary, table = evaluate_localization(backbone, dataset, device=device, progress=progress, **settings)
    summary = {**describe_weights(weights, backbone), "data": str(data), "seed": seed, **summary}
    write_results(out, summary, {"items": table})
    return summary


def format_localization(summary: dict) -> str:
    """A short table per task: MaxBoxAccV2 and BoxAcc at each IoU (%), against the data prior."""
    rows = []
    for task, r in summary["results"].items():
        for name, m in (("CAM", r), ("data prior", r["prior"])):
            rows.append({"task": task, "map": name, "MaxBoxAccV2 %": 100 * m["max_box_acc_v2"],
                         **{f"IoU {d:g} %": 100 * m[f"box_acc@{d:g}"] for d in summary["iou_thresholds"]},
                         "probe AUC": r["probe_auc"] if name == "CAM" else None,
                         "peak in box": r["peak_in_box"] if name == "CAM" else None})
    cols = ["task", "map", "MaxBoxAccV2 %", *[f"IoU {d:g} %" for d in summary["iou_thresholds"]],
            "probe AUC", "peak in box"]
    return format_table(rows, cols)
