"""Zero-shot anatomical correspondence and part-whole consistency of a backbone.

Landmark matching: every image goes onto a ``size x size`` canvas through the preprocessing contract
(``holons.data.preprocess``, letterbox; the evaluation frame); its dense
last-stage features are bilinearly upsampled to that frame. A source landmark's feature is the
upsampled map sampled (bilinearly) at the landmark; its match in the target image is the pixel
of highest cosine similarity. The predicted pixel is mapped back to the target's own frame
(1024 px for JSRT) and compared with the target's landmark of the same index: error in pixels
and PCK at fixed radii, per structure and overall, over ordered image pairs of different
patients from the evaluation split.

Part-whole consistency: the cosine between the pooled embedding of a whole W and the mean of the
embeddings of its k x k parts (each resized to the input size). W is the full image, and
optionally random crops of half the side (granularity level 1). Raw cosines of pooled features sit
near 1 for any backbone, random init included, so the summary also gives the cosine after removing
the common mean embedding and the share of wholes whose own parts are the best match among all
wholes' parts (part-whole retrieval).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from holons.data.annotated import (
    STRUCTURES,
    AnnotatedRadiographs,
    landmarks_to_canvas,
    landmarks_to_source,
    load_annotated,
)
from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.eval.features import (
    dense_features,
    describe_weights,
    input_stats,
    load_backbone,
    pooled_embeddings,
    progress_enabled,
    resolve_device,
    to_input,
)
from holons.eval.results import format_table, write_results
from holons.finetune.metrics import error_summary, landmark_errors
from holons.ssl.backbone import Backbone

__all__ = [
    "CorrespondenceResult", "match_points", "sample_pairs", "part_whole_cosines",
    "evaluate_correspondence", "run_correspondence", "format_correspondence",
]

DEFAULT_RADII = (10.0, 20.0, 40.0)
TIE_TOLERANCE = 1e-6
"""Cosines this close to the best one count as equally good matches (float32 rounding)."""


@dataclass
class CorrespondenceResult:
    """``summary`` (JSON-ready dict), ``points`` (one row per pair and landmark), ``part_whole``
    (one row per whole)."""

    summary: dict
    points: pd.DataFrame
    part_whole: pd.DataFrame


def match_points(src_feats: torch.Tensor, src_points: np.ndarray, tgt_feats: torch.Tensor) -> np.ndarray:
    """Best cosine match in ``tgt_feats`` (``C x H x W``) of the features of ``src_feats`` at ``src_points``.

    ``src_points`` are (x, y) pixels of the ``src_feats`` frame (pixel-centre convention); the
    result is ``N x 2`` (x, y) pixels of the ``tgt_feats`` frame.

    Ties: a coarse map upsampled bilinearly (``align_corners=False``) is constant within half a
    cell of the border, so many pixels there hold the very same feature. A plain argmax would
    return the first of them (top-left), a bias of up to half a cell towards the image origin
    even when the source and target images are identical; the match is the mean position
    of all pixels within ``TIE_TOLERANCE`` of the best cosine.
    """
    c, h, w = src_feats.shape
    pts = torch.as_tensor(np.asarray(src_points, dtype=np.float32), device=src_feats.device)
    grid = torch.stack([(pts[:, 0] + 0.5) / w * 2 - 1, (pts[:, 1] + 0.5) / h * 2 - 1], dim=1)
    query = F.grid_sample(src_feats[None].float(), grid[None, :, None], mode="bilinear",
                          padding_mode="border", align_corners=False)[0, :, :, 0].T  # N x C
    query = F.normalize(query, dim=1)
    th, tw = tgt_feats.shape[1:]
    keys = F.normalize(tgt_feats.float().reshape(tgt_feats.shape[0], -1), dim=0)  # C x HW
    sim = query @ keys  # N x HW
    tied = (sim >= sim.max(dim=1, keepdim=True).values - TIE_TOLERANCE).double()
    pix = torch.arange(th * tw, device=sim.device)
    xy = torch.stack([pix % tw, pix // tw], dim=1).double()  # HW x 2
    return ((tied @ xy) / tied.sum(dim=1, keepdim=True)).cpu().numpy()


def sample_pairs(ids: Sequence[str], patients: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``n`` ordered (source, target) pairs of distinct images, of different patients where possible."""
    ids = list(ids)
    pairs = [(i, j) for i in range(len(ids)) for j in range(len(ids)) if i != j]
    cross = [(i, j) for i, j in pairs if patients[i] != patients[j]]
    pool = cross or pairs
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [(ids[pool[k][0]], ids[pool[k][1]]) for k in order]


def _quadrants(x: torch.Tensor, k: int, size: int) -> list[torch.Tensor]:
    h, w = x.shape[-2:]
    parts = []
    for r in range(k):
        for c in range(k):
            tile = x[..., r * h // k:(r + 1) * h // k, c * w // k:(c + 1) * w // k]
            parts.append(F.interpolate(tile, size=(size, size), mode="bilinear", align_corners=False))
    return parts


def part_whole_cosines(backbone: Backbone, x: torch.Tensor, *, k: int = 2, random_wholes: int = 0,
                       seed: int = 0, batch_size: int = 16,
                       device: str | torch.device = "cpu") -> pd.DataFrame:
    """Cosine of E(W) with the mean of E(parts) for each image (W = full image) and for ``random_wholes``
    random half-side crops per image. ``x`` are normalized ``B x 1 x S x S`` inputs.

    Pooled features of one backbone share a large common direction (a random init already gives raw
    cosines near 1), so two more columns measure what is specific to each whole: ``cosine_centred``, the
    cosine after subtracting the mean embedding of the wholes and part means of the same kind (0 when
    every embedding is the same), and ``retrieved``, whether a whole's own part mean is the nearest
    (centred cosine) among the part means of all wholes of its kind (chance: 1 / their number).

    Returns rows ``index`` (image position in ``x``), ``whole`` ("image" | "random"), ``cosine``,
    ``cosine_centred``, ``retrieved``.
    """
    size = x.shape[-1]
    wholes, kinds, owners = [x], ["image"] * len(x), list(range(len(x)))
    if random_wholes > 0:
        rng = np.random.default_rng(seed)
        side = size // 2
        crops = []
        for i in range(len(x)):
            for _ in range(random_wholes):
                top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                crop = x[i:i + 1, :, top:top + side, left:left + side]
                crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
                kinds.append("random")
                owners.append(i)
        wholes.append(torch.cat(crops))
    whole = torch.cat(wholes)
    e_whole = pooled_embeddings(backbone, whole, batch_size=batch_size, device=device)
    e_parts = torch.stack([pooled_embeddings(backbone, p, batch_size=batch_size, device=device)
                           for p in _quadrants(whole, k, size)]).mean(dim=0)
    cos = F.cosine_similarity(e_whole, e_parts, dim=1).numpy()
    kind_of = np.asarray(kinds)
    cos_centred = np.zeros(len(kinds))
    retrieved = np.zeros(len(kinds), dtype=bool)
    for kind in dict.fromkeys(kinds):  # one centre per kind: upsampled crops share an offset of their own
        rows = torch.from_numpy(np.flatnonzero(kind_of == kind))
        w, p = e_whole[rows], e_parts[rows]
        centre = torch.cat([w, p]).mean(dim=0, keepdim=True)
        w, p = F.normalize(w - centre, dim=1), F.normalize(p - centre, dim=1)
        cos_centred[rows.numpy()] = (w * p).sum(dim=1).numpy()
        retrieved[rows.numpy()] = ((w @ p.T).argmax(dim=1) == torch.arange(len(rows))).numpy()
    return pd.DataFrame({"index": owners, "whole": kinds, "cosine": cos.astype(np.float64),
                         "cosine_centred": cos_centred.astype(np.float64), "retrieved": retrieved})


def evaluate_correspondence(
    backbone: Backbone,
    data: AnnotatedRadiographs,
    *,
    size: int = 256,
    pairs: int = 20,
    seed: int = 0,
    split: str | None = "auto",
    radii: Sequence[float] = DEFAULT_RADII,
    part_whole: bool = True,
    random_wholes: int = 0,
    k: int = 2,
    stages: int = 1,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> CorrespondenceResult:
    """Landmark matching over ``pairs`` image pairs of ``split`` (``"auto"``: test, else val, else all)
    and part-whole consistency over the same images. ``stages`` > 1 matches on the last ``stages``
    pyramid levels concatenated (finer grid) instead of the last stage alone."""
    t0 = time.perf_counter()
    dev = resolve_device(device if device is None else str(device))
    split = data.default_eval_split() if split == "auto" else split
    ids = data.ids(split)
    if len(ids) < 2:
        raise HolonsError(f"correspondence needs at least 2 images in split {split!r}, found {len(ids)}")
    stats = input_stats(backbone)
    show = progress_enabled(progress)

    patients = [data.patient(i) for i in ids]
    chosen = sample_pairs(ids, patients, pairs, seed)
    used = sorted({i for p in chosen for i in p}, key=ids.index)
    preprocessing = Preprocessing(size=size)
    images, geometries, frames = {}, {}, {}
    for image_id in tqdm(used, desc="read images", disable=not show):
        images[image_id], geometries[image_id] = preprocessing.read(data.image_path(image_id))
        frames[image_id] = (geometries[image_id].orig_h, geometries[image_id].orig_w)
    x = to_input(np.stack([images[i] for i in used]), stats)
    maps = dense_features(backbone, x, stages=stages, batch_size=batch_size, device=dev)
    feats = dict(zip(used, maps, strict=True))

    rows = []
    for src, tgt in tqdm(chosen, desc="pairs", disable=not show):
        src_lm, tgt_lm = data.landmarks(src), data.landmarks(tgt)
        up = F.interpolate(torch.stack([feats[src], feats[tgt]]), size=(size, size), mode="bilinear",
                           align_corners=False)
        for s in STRUCTURES:
            if len(src_lm[s]) != len(tgt_lm[s]):
                raise HolonsError(f"{s}: {src} has {len(src_lm[s])} landmarks but {tgt} has {len(tgt_lm[s])}")
            pred = match_points(up[0], landmarks_to_canvas(src_lm[s], geometries[src]), up[1])
            pred = landmarks_to_source(pred, geometries[tgt])
            err = landmark_errors(pred, tgt_lm[s])
            for p, (e, (px, py), (gx, gy)) in enumerate(zip(err, pred, tgt_lm[s], strict=True)):
                rows.append((src, tgt, s, p, gx, gy, px, py, e))
    points = pd.DataFrame(rows, columns=["source", "target", "structure", "point", "x_true", "y_true",
                                         "x_pred", "y_pred", "error_px"])

    summary: dict = {
        "protocol": "correspondence", "split": split or "all", "size": size, "pairs": len(chosen),
        "images": len(used), "seed": seed, "stages": stages, "radii_px": list(radii),
        "frame_px": sorted({f"{h}x{w}" for h, w in (frames[t] for _, t in chosen)}),
        "overall": error_summary(points["error_px"].to_numpy(), radii),
        "per_structure": {s: error_summary(points.loc[points["structure"] == s, "error_px"].to_numpy(), radii)
                          for s in STRUCTURES},
    }
    pair_means = points.groupby(["source", "target"])["error_px"].mean()
    summary["pair_mean_px"] = {"mean": float(pair_means.mean()), "median": float(pair_means.median()),
                               "std": float(pair_means.std(ddof=0))}

    pw = pd.DataFrame(columns=["image", "whole", "cosine", "cosine_centred", "retrieved"])
    if part_whole:
        pw = part_whole_cosines(backbone, x, k=k, random_wholes=random_wholes, seed=seed,
                                batch_size=batch_size, device=dev)
        pw.insert(0, "image", [used[i] for i in pw.pop("index")])
        summary["part_whole"] = {
            kind: {"mean": float(g["cosine"].mean()), "median": float(g["cosine"].median()),
                   "centred_median": float(g["cosine_centred"].median()),
                   "retrieval_top1": float(g["retrieved"].mean()), "n": int(len(g))}
            for kind, g in pw.groupby("whole")
        }
    summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return CorrespondenceResult(summary=summary, points=points, part_whole=pw)


def format_correspondence(summary: dict) -> str:
    """A short per-structure table of a correspondence summary."""
    radii = [int(r) if float(r).is_integer() else r for r in summary["radii_px"]]
    keys = ["mean_px", "median_px"] + [f"pck@{r}" for r in radii]
    rows = [{"structure": s, **m} for s, m in summary["per_structure"].items()]
    rows.append({"structure": "all", **summary["overall"]})
    text = format_table(rows, ["structure", *keys, "n_points"])
    for kind, m in summary.get("part_whole", {}).items():
        text += (f"\npart-whole cosine ({kind} wholes): median {m['median']:.3f}, "
                 f"mean {m['mean']:.3f}, centred median {m['centred_median']:.3f}, "
                 f"retrieval top-1 {100 * m['retrieval_top1']:.0f} %, n {m['n']}")
    return text


def run_correspondence(weights: str | Path, data: str | Path, out: str | Path, *, arch: str | None = None,
                       **settings) -> dict:
    """Load ``weights`` (a folder or "random" with ``arch``), evaluate on the set at ``data``, write
    ``OUT/results.json``, ``OUT/points.csv`` and ``OUT/part_whole.csv``; return the summary."""
    backbone = load_backbone(weights, arch)
    result = evaluate_correspondence(backbone, load_annotated(data), **settings)
    summary = {**describe_weights(weights, backbone), "data": str(data), **result.summary}
    write_results(out, summary, {"points": result.points, "part_whole": result.part_whole})
    return summary
