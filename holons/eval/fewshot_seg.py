"""Few-shot segmentation protocol: how well a backbone's features segment from N labelled images.

Protocol: for each shot count N and seed, N support images are drawn (seeded) from the train
split; a decoder (and, in ``finetune`` mode, the encoder too) is trained on them with
``holons.finetune.segmenter.train_segmenter`` (mild random affine augmentation), then Dice per
structure is measured on the evaluation split (JSRT: train -> val of ``hybridgnet_split``;
phantoms: train -> test). The structures are the data's own (``masks/<structure>/``). Images and
masks go through the preprocessing contract (``holons.data.preprocess``, letterbox at ``size``);
Dice is computed on that canvas.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from holons.data.annotated import AnnotatedRadiographs, load_annotated
from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.eval.features import (
    describe_weights,
    input_stats,
    load_backbone,
    progress_enabled,
    resolve_device,
    to_input,
)
from holons.eval.results import format_table, write_results
from holons.finetune.heads import STRUCTURE_GROUPS, structure_groups
from holons.finetune.metrics import dice
from holons.finetune.segmenter import DEFAULT_STEPS, MODES, predict_masks, train_segmenter
from holons.ssl.backbone import Backbone

__all__ = ["FewShotResult", "evaluate_fewshot_segmentation", "run_fewshot_segmentation", "format_fewshot"]

@dataclass
class FewShotResult:
    """``summary`` (JSON-ready dict) and ``scores`` (one row per mode, shots, seed, image, structure)."""

    summary: dict
    scores: pd.DataFrame


def _load_split(data: AnnotatedRadiographs, ids: Sequence[str], preprocessing: Preprocessing
                ) -> tuple[np.ndarray, np.ndarray]:
    """Canvases (``N x S x S``) and canvas masks (``N x K x S x S``) of ``ids``."""
    images, masks = [], []
    for image_id in ids:
        canvas, geometry = preprocessing.read(data.image_path(image_id))
        images.append(canvas)
        masks.append(preprocessing.mask(data.masks(image_id), geometry))
    return np.stack(images), np.stack(masks)


def evaluate_fewshot_segmentation(
    backbone: Backbone,
    data: AnnotatedRadiographs,
    *,
    shots: Sequence[int] = (3, 6, 12, 24),
    seeds: Sequence[int] = (0, 1, 2),
    modes: Sequence[str] = MODES,
    size: int = 128,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    lr: float = 3e-3,
    encoder_lr: float = 1e-4,
    width: int = 16,
    image_width: int = 16,
    group_decoders: bool = True,
    bce_weight: float = 1.0,
    balance_bce: bool = True,
    support_split: str = "train",
    eval_split: str | None = "auto",
    max_eval: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> FewShotResult:
    """Dice per structure for every (mode, shots, seed); summary = mean and std over seeds.

    ``summary["support_dice"]`` holds the same for the support images themselves: a decoder that does
    not fit its own support set (well below 1, thin structures first) needs more ``steps``.

    Decoder and loss (see ``train_segmenter``): ``image_width`` channels at the scales finer than the
    backbone's pyramid, fed by the input image, so that logits are made at full resolution from
    full-resolution evidence (0: the older decoder over the pyramid alone); ``group_decoders`` gives
    lungs, heart and clavicles a decoder each (False: one shared decoder, in which the clavicles
    lose out to the large structures); ``bce_weight`` / ``balance_bce``: the (class-balanced) BCE term
    next to the soft Dice (``SegmentationLoss``).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if not data.structures:
        raise HolonsError(f"{data.root} has no masks/<structure>/ folders")
    structures = list(data.structures)
    preprocessing = Preprocessing(size=size)
    for m in modes:
        if m not in MODES:
            raise HolonsError(f"unknown mode {m!r}; choose from {MODES}")
    eval_split = data.default_eval_split() if eval_split == "auto" else eval_split
    pool = data.ids(support_split)
    eval_ids = data.ids(eval_split)[: max_eval or None]
    if not eval_ids:
        raise HolonsError(f"no evaluation images in split {eval_split!r}")
    if not pool or max(shots) > len(pool):
        raise HolonsError(f"{max(shots)} shots need that many images in split {support_split!r}, "
                          f"found {len(pool)}")
    stats = input_stats(backbone)
    show = progress_enabled(progress)
    ev_img, ev_mask = _load_split(data, eval_ids, preprocessing)
    ev_x = to_input(ev_img, stats)
    support_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    groups = structure_groups(structures) if group_decoders else None
    runs = [(m, n, s) for m in modes for n in shots for s in seeds]
    rows, support_rows = [], []
    for mode, n, seed in tqdm(runs, desc="few-shot runs", disable=not show):
        chosen = [pool[i] for i in np.random.default_rng([seed, n]).choice(len(pool), size=n, replace=False)]
        for i in chosen:
            if i not in support_cache:
                img, msk = _load_split(data, [i], preprocessing)
                support_cache[i] = (img[0], msk[0])
        x = to_input(np.stack([support_cache[i][0] for i in chosen]), stats)
        support_masks = np.stack([support_cache[i][1] for i in chosen])
        y = torch.from_numpy(support_masks.astype(np.float32))
        model = train_segmenter(backbone, x, y, mode=mode, steps=steps, batch_size=batch_size, lr=lr,
                                encoder_lr=encoder_lr, width=width, image_width=image_width, groups=groups,
                                bce_weight=bce_weight, balance_bce=balance_bce, seed=seed, device=dev)
        scored = ((rows, eval_ids, ev_x, ev_mask), (support_rows, chosen, x, support_masks))
        for out_rows, ids, inputs, truth in scored:  # the evaluation images, then the support set itself
            pred = predict_masks(model, inputs, batch_size=batch_size, device=dev)
            out_rows += [(mode, n, seed, image_id, s, dice(pred[j, k], truth[j, k]))
                         for j, image_id in enumerate(ids) for k, s in enumerate(structures)]
    columns = ["mode", "shots", "seed", "image", "structure", "dice"]
    scores = pd.DataFrame(rows, columns=columns)
    summary = {
        "protocol": "fewshot-seg", "support_split": support_split, "eval_split": eval_split or "all",
        "eval_images": len(eval_ids), "size": size, "preprocessing": preprocessing.to_dict(),
        "structures": structures, "steps": steps, "shots": list(shots),
        "decoder": {"width": width, "image_width": image_width, "group_decoders": group_decoders,
                    "bce_weight": bce_weight, "balance_bce": balance_bce, "lr": lr},
        "seeds": list(seeds), "modes": list(modes), "dice": _summarize(scores, structures),
        "support_dice": _summarize(pd.DataFrame(support_rows, columns=columns), structures),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return FewShotResult(summary=summary, scores=scores)


def _summarize(scores: pd.DataFrame, structures: Sequence[str]) -> dict:
    """{mode: {shots: {structure or group: {"mean", "std", "per_seed"}}}}: per-seed mean Dice over images,
    then mean and standard deviation over seeds. Groups (lungs, clavicles) average their structures,
    where the set has them."""
    per_seed = scores.groupby(["mode", "shots", "seed", "structure"])["dice"].mean()
    out: dict = {}
    for (mode, n), block in per_seed.groupby(level=["mode", "shots"]):
        table = block.unstack("structure")  # seeds x structures
        for group, members in STRUCTURE_GROUPS.items():
            if set(members) <= set(table.columns):
                table[group] = table[list(members)].mean(axis=1)
        table["mean"] = table[list(structures)].mean(axis=1)
        out.setdefault(mode, {})[str(n)] = {
            col: {"mean": float(table[col].mean()), "std": float(table[col].std(ddof=0)),
                  "per_seed": [float(v) for v in table[col]]}
            for col in table.columns
        }
    return out


def format_fewshot(summary: dict) -> str:
    """A short table: mean Dice (± std over seeds) per mode, shots and structure group, and the mean
    Dice on the support images themselves ("support fit": well below 1 means too few decoder steps)."""
    first = next(iter(next(iter(summary["dice"].values())).values()))
    cols = [c for c in ("heart", "lungs", "clavicles") if c in first]
    cols = (cols or [c for c in first if c != "mean"]) + ["mean"]
    fit = summary.get("support_dice", {})
    rows = []
    for mode, by_n in summary["dice"].items():
        for n, d in by_n.items():
            cells = {c: f"{d[c]['mean']:.3f}±{d[c]['std']:.3f}" for c in cols}
            support = fit.get(mode, {}).get(n)
            cells["support fit"] = f"{support['mean']['mean']:.3f}" if support else "-"
            rows.append({"mode": mode, "shots": n, **cells})
    return format_table(rows, ["mode", "shots", *cols, "support fit"])


def run_fewshot_segmentation(
    weights: str | Path, data: str | Path, out: str | Path, *, arch: str | None = None, **settings
) -> dict:
    """Load ``weights``, run the protocol on the set at ``data``, write ``OUT/results.json`` and
    ``OUT/dice.csv``; return the summary."""
    backbone = load_backbone(weights, arch)
    result = evaluate_fewshot_segmentation(backbone, load_annotated(data), **settings)
    summary = {**describe_weights(weights, backbone), "data": str(data), **result.summary}
    write_results(out, summary, {"dice": result.scores})
    return summary
