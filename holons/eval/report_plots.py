"""The plots and loss curves of a comparison report (``holons.eval.report``): bars with 95 % intervals,
correspondence examples, pretraining loss curves, part-whole cosine distributions."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from holons.data.annotated import load_annotated
from holons.eval.features import RANDOM
from holons.files import atomic_path

PROTOCOL_TITLES = {"correspondence": "Zero-shot landmark correspondence",
                   "fewshot-seg": "Few-shot segmentation", "classify": "Classification",
                   "cam": "CAM localization"}
LOSS_TERMS = ("loss", "loss_loc", "loss_comp", "loss_dec")


def read_loss_curves(run_dir: str | Path) -> pd.DataFrame:
    """The loss terms of a run's ``metrics.jsonl`` (columns ``step`` and the terms present); lines that
    are not JSON (e.g. cut by a kill) are skipped."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                rows.append({k: rec.get(k) for k in ("step", "stage", *LOSS_TERMS) if k in rec})
    frame = pd.DataFrame(rows)
    return frame.apply(pd.to_numeric, errors="coerce") if len(frame) else frame


# --------------------------------------------------------------------------- plots
def _colors(names: Sequence[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    out, k = {}, 0
    for n in names:
        if n == RANDOM:
            out[n] = "#8c8c8c"
        else:
            out[n] = palette[k % len(palette)]
            k += 1
    return out


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _grid(n_panels: int, ncols: int, w: float, h: float) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _bounds(metric: str) -> tuple[float, float]:
    """The range a metric can take, to clip the drawn intervals (a t-interval over few seeds can leave it)."""
    if "(%)" in metric:
        return 0.0, 100.0
    if "cosine" in metric:
        return -1.0, 1.0
    if "(px)" in metric:
        return 0.0, math.inf
    return 0.0, 1.0  # Dice, AUC, accuracy


def plot_bars(table: pd.DataFrame, protocol: str, methods: Sequence[str], path: Path) -> Path | None:
    """One panel per metric, settings on the x axis, one bar per method with its 95 % interval over
    seeds and the per-seed values as dots."""
    block = table[table["protocol"] == protocol]
    if block.empty:
        return None
    metrics = list(dict.fromkeys(block["metric"]))
    colors = _colors(methods)
    fig, axes = _grid(len(metrics), 3, 5.2, 3.6)
    width = 0.8 / len(methods)
    for ax, metric in zip(axes, metrics, strict=True):
        sub = block[block["metric"] == metric]
        settings = list(dict.fromkeys(sub["setting"]))
        for j, m in enumerate(methods):
            for i, s in enumerate(settings):
                row = sub[(sub["setting"] == s) & (sub["method"] == m)]
                if row.empty or not math.isfinite(row["mean"].iloc[0]):
                    continue
                r = row.iloc[0]
                x = i + (j - (len(methods) - 1) / 2) * width
                err = None
                if math.isfinite(r["ci_lo"]):
                    lo, hi = _bounds(metric)
                    err = [[r["mean"] - max(r["ci_lo"], lo)], [min(r["ci_hi"], hi) - r["mean"]]]
                ax.bar(x, r["mean"], width * 0.9, yerr=err, capsize=3, color=colors[m], edgecolor="black",
                       linewidth=0.4)
                seeds = [v for v in r["per_seed"] if math.isfinite(v)]
                ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=25 if len(settings) > 2 else 0, ha="right" if len(settings) > 2
                           else "center", fontsize=8)
        arrow = "higher is better" if sub["higher_is_better"].iloc[0] else "lower is better"
        ax.set_title(f"{metric} ({arrow})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if not np.isfinite(sub["mean"].to_numpy(dtype=float)).any():
            ax.text(0.5, 0.5, "undefined for every method\n(e.g. one class in the test split)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8)
    fig.legend(handles=[Patch(facecolor=colors[m], edgecolor="black", label=m) for m in methods],
               loc="outside lower center", ncols=len(methods), fontsize=8)
    fig.suptitle(f"{PROTOCOL_TITLES[protocol]}: mean over seeds, bars = 95 % interval, dots = seeds",
                 fontsize=10)
    return _save(fig, path)


def plot_correspondence_examples(data: str | Path, points: Mapping[str, pd.DataFrame], path: Path,
                                 max_pairs: int = 2) -> Path | None:
    """For the first image pairs: the source with its landmarks, then per method the target with the
    ground truth (green) and the predicted points (red), joined by their error."""
    frames = {m: p for m, p in points.items() if len(p)}
    if not frames:
        return None
    ds = load_annotated(data)
    first = next(iter(frames.values()))
    pairs = list(dict.fromkeys(zip(first["source"].astype(str), first["target"].astype(str),
                                   strict=True)))[:max_pairs]
    methods = list(frames)
    fig = Figure(figsize=(3.0 * (1 + len(methods)), 3.2 * len(pairs)), layout="constrained")
    for r, (src, tgt) in enumerate(pairs):
        ax = fig.add_subplot(len(pairs), 1 + len(methods), r * (1 + len(methods)) + 1)
        ax.imshow(ds.read(src), cmap="gray", vmin=0, vmax=1)
        for pts in ds.landmarks(src).values():
            ax.scatter(pts[:, 0], pts[:, 1], s=3, color="#00d0ff")
        ax.set_title(f"source {src}", fontsize=8)
        ax.axis("off")
        target_img = ds.read(tgt)
        for c, m in enumerate(methods):
            p = frames[m]
            p = p[(p["source"].astype(str) == src) & (p["target"].astype(str) == tgt)]
            ax = fig.add_subplot(len(pairs), 1 + len(methods), r * (1 + len(methods)) + c + 2)
            ax.imshow(target_img, cmap="gray", vmin=0, vmax=1)
            for _, q in p.iterrows():
                ax.plot([q["x_true"], q["x_pred"]], [q["y_true"], q["y_pred"]], color="#ffd000", lw=0.5)
            ax.scatter(p["x_true"], p["y_true"], s=3, color="#00e000")
            ax.scatter(p["x_pred"], p["y_pred"], s=3, color="#ff2020", marker="x", linewidths=0.6)
            err = p["error_px"].mean() if len(p) else math.nan
            ax.set_title(f"{m}: target {tgt}\nmean error {err:.1f} px", fontsize=8)
            ax.axis("off")
    fig.suptitle("Correspondence: source landmarks (cyan) -> predicted (red) vs. true (green) target points",
                 fontsize=9)
    return _save(fig, path)


def plot_loss_curves(curves: Mapping[str, pd.DataFrame], path: Path, methods: Sequence[str]) -> Path | None:
    """One panel per loss term, one line per pretraining run."""
    curves = {m: c for m, c in curves.items() if len(c)}
    terms = [t for t in LOSS_TERMS if any(t in c and c[t].notna().any() for c in curves.values())]
    if not terms:
        return None
    colors = _colors(methods)
    fig, axes = _grid(len(terms), 4, 4.0, 3.0)
    for ax, term in zip(axes, terms, strict=True):
        for m, c in curves.items():
            if term in c and c[term].notna().any():
                ax.plot(c["step"], c[term], label=m, color=colors.get(m, "black"), lw=1.2)
                if "stage" in c:  # where the curriculum enters a new stage
                    for step in c.loc[c["stage"].diff() > 0, "step"]:
                        ax.axvline(step, color=colors.get(m, "black"), ls=":", lw=0.8)
        ax.set_title({"loss": "total loss", "loss_loc": "localizability", "loss_comp": "composability",
                      "loss_dec": "decomposability"}[term], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Pretraining loss terms (metrics.jsonl); dotted: a new curriculum stage", fontsize=10)
    return _save(fig, path)


def plot_part_whole(cosines: Mapping[str, pd.DataFrame], path: Path, methods: Sequence[str]) -> Path | None:
    """Distribution of the centred cos(E(W), mean E(parts)) per method, one panel per kind of whole (raw
    cosines sit near 1 for any backbone)."""
    cosines = {m: c for m, c in cosines.items() if len(c)}
    if not cosines:
        return None
    kinds = list(dict.fromkeys(k for c in cosines.values() for k in c["whole"]))
    colors = _colors(methods)
    fig, axes = _grid(len(kinds), 2, 1.4 + 1.3 * len(cosines), 3.4)
    rng = np.random.default_rng(0)
    for ax, kind in zip(axes, kinds, strict=True):
        names = [m for m in cosines if (cosines[m]["whole"] == kind).any()]
        values = [cosines[m].loc[cosines[m]["whole"] == kind, "cosine_centred"].to_numpy(float)
                  for m in names]
        box = ax.boxplot(values, patch_artist=True, showfliers=False, widths=0.6)
        for patch, m in zip(box["boxes"], names, strict=True):
            patch.set_facecolor(colors.get(m, "white"))
            patch.set_alpha(0.5)
        for i, v in enumerate(values):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(v)), v, s=5, color="black", alpha=0.6)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(f"{kind} wholes", fontsize=9)
        ax.set_ylabel("centred cosine", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Part-whole consistency: centred cosine of E(whole) and the mean of E(parts), all seeds",
                 fontsize=10)
    return _save(fig, path)

