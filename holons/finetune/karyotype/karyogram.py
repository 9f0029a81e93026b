"""Karyogram figure: one case's chromosomes in the standard rows, upright, labelled, with warnings.

Rows (ISCN layout): 1-3; 4-5; 6-12 and X; 13-18; 19-20; 21-22 and Y. Each chromosome is shown in
the G-band display convention (dark bands on white) and turned upright by its predicted polarity
(a polarity-0 chromosome is flipped vertically). Slots are labelled with the type name; the
dispatch warnings are written under the title.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from holons.errors import HolonsError
from holons.files import atomic_write

KARYOGRAM_ROWS: tuple[tuple[int, ...], ...] = (
    (1, 2, 3), (4, 5), (6, 7, 8, 9, 10, 11, 12, 23), (13, 14, 15, 16, 17, 18), (19, 20), (21, 22, 24),
)
"""Types (1..24, 23 = X, 24 = Y) per row of the standard karyogram."""


def slot_name(class_1to24: int) -> str:
    return {23: "X", 24: "Y"}.get(int(class_1to24), str(int(class_1to24)))


def draw_karyogram(chromosomes: Sequence[tuple[np.ndarray, int, int]], out_png: str | Path, *,
                   warnings: Sequence[str] = (), title: str = "") -> dict[str, tuple[int, int]]:
    """Draw ``(display image, class_1to24, polarity)`` triples to ``out_png``.

    Display images are 2-D floats in [0, 1], dark chromosome on white. Returns the slots:
    type name -> (row, position in row), one per type of :data:`KARYOGRAM_ROWS`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type: dict[int, list[np.ndarray]] = {}
    for image, k, polarity in chromosomes:
        if not 1 <= int(k) <= 24:
            continue
        img = np.asarray(image, dtype=np.float32)
        by_type.setdefault(int(k), []).append(img[::-1] if int(polarity) == 0 else img)
    gap = 6.0
    row_h = [max([im.shape[0] for k in row for im in by_type.get(k, [])] + [20]) for row in KARYOGRAM_ROWS]
    slot_w = {k: max(sum(im.shape[1] + gap for im in by_type.get(k, [])), 30.0) + 2 * gap
              for row in KARYOGRAM_ROWS for k in row}
    width = max(sum(slot_w[k] for k in row) for row in KARYOGRAM_ROWS)
    height = sum(h + 3 * gap + 12 for h in row_h)
    scale = 1 / 60
    fig = plt.figure(figsize=(max(6.0, width * scale), max(4.0, height * scale + 0.8)), dpi=100)
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98 - 0.3 / max(4.0, height * scale + 0.8) * (1 + len(warnings))])
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    slots: dict[str, tuple[int, int]] = {}
    top = 0.0
    for r, row in enumerate(KARYOGRAM_ROWS):
        h = row_h[r]
        x = (width - sum(slot_w[k] for k in row)) / 2
        base = top + gap + h
        for c, k in enumerate(row):
            slots[slot_name(k)] = (r, c)
            cx = x + gap
            for im in by_type.get(k, []):
                ax.imshow(im, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                          extent=(cx, cx + im.shape[1], base, base - im.shape[0]))
                cx += im.shape[1] + gap
            ax.plot([x + gap, x + slot_w[k] - gap], [base + 2, base + 2], color="0.3", lw=0.8)
            abnormal = len(by_type.get(k, [])) != (2 if k <= 22 else len(by_type.get(k, [])))
            ax.text(x + slot_w[k] / 2, base + 4, slot_name(k), ha="center", va="top", fontsize=8,
                    color="red" if abnormal else "black", gid=f"slot-{slot_name(k)}")
            x += slot_w[k]
        top += h + 3 * gap + 12
    lines = ([title] if title else []) + [f"warning: {w}" for w in warnings]
    for i, line in enumerate(lines):
        fig.text(0.01, 0.995 - 0.035 * i, line, ha="left", va="top", fontsize=9,
                 color="black" if (title and i == 0) else "red")
    out_png = Path(out_png)
    with atomic_write(out_png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return slots


def karyogram_from_predictions(predictions: str | Path, case_id: str, out_png: str | Path) -> dict:
    """Draw case ``case_id`` of a ``holons karyotype predict`` folder (dispatched types, predicted
    polarity, the case's warnings)."""
    import json

    from holons.data.readers import UnreadableImage, read_image
    from holons.finetune.karyotype.predict import CASES, case_file_name, read_predictions
    from holons.finetune.karyotype.preprocess import chromosome_crop

    frame, info = read_predictions(predictions)
    rows = frame[frame["case_id"] == str(case_id)]
    if rows.empty:
        known = ", ".join(sorted(frame["case_id"].unique())[:5])
        raise HolonsError(f"case {case_id!r} is not in {predictions} (cases include: {known}, ...)")
    root = Path(info["data_root"])
    items = []
    for _, row in rows.iterrows():
        path = Path(row["path"])
        try:
            pixels = read_image(path if path.is_absolute() else root / path).pixels
        except UnreadableImage:
            continue
        display = 1.0 - chromosome_crop(pixels, info["stain"])
        items.append((display, int(row["dispatched_class_1to24"]), int(row["pred_polarity"])))
    case_json = Path(predictions) / CASES / case_file_name(case_id)
    warnings = json.loads(case_json.read_text())["warnings"] if case_json.is_file() else []
    sex = json.loads(case_json.read_text()).get("sex", "") if case_json.is_file() else ""
    title = f"case {case_id}: {len(items)} chromosomes" + (f", sex {sex}" if sex else "")
    return draw_karyogram(items, out_png, warnings=warnings, title=title)
