"""Synthetic karyotypes: single-chromosome images of whole cells, laid out like ``pki3_gband``.

Each of the 24 classes has an ISCN-like relative length and centromere index and its own fixed
band pattern, so type and polarity are learnable exactly as on real karyograms. Cell-to-cell
condensation changes the scale, so length alone does not separate neighbouring classes.

The chromosomes are drawn by ``chromosomes``, in the look of a lab from ``lab_styles``; this
module lays out cells and writes data sets of them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from holons.data.synthetic.chromosomes import CHROMOSOME_TABLE, DEFAULT_SCALE, render_chromosome
from holons.data.synthetic.lab_styles import LabStyle, apply_lab_style, resolve_style
from holons.data.workers import usable_cpus
from holons.errors import HolonsError
from holons.files import atomic_write

MANIFEST_COLUMNS = (
    "path", "case_id", "slide_id", "cell_no", "class_1to24", "label_0to23", "class_name", "copy",
    "height", "width", "mode", "polarity", "karyotype",
)


@dataclass(frozen=True)
class CellPlan:
    """One synthetic cell: where it goes and which chromosomes it holds."""

    index: int
    case_id: str
    slide_id: str
    cell_no: int
    karyotype: str
    counts: tuple[int, ...]  # copies of class 1..24


_ABNORMALITIES = ("+21", "+18", "+13", "45,X", "47,XXY", "-k")
_ABNORMAL_WEIGHTS = (0.30, 0.10, 0.08, 0.15, 0.10, 0.27)


def cell_counts(rng: np.random.Generator, abnormal: bool) -> tuple[str, tuple[int, ...]]:
    """A karyotype string (ISCN short form) and the copies of classes 1..24 it implies."""
    counts = [2] * 22 + [2, 0]
    male = bool(rng.random() < 0.5)
    if male:
        counts[22], counts[23] = 1, 1
    extras: list[str] = []
    if abnormal:
        kind = _ABNORMALITIES[rng.choice(len(_ABNORMALITIES), p=_ABNORMAL_WEIGHTS)]
        if kind == "45,X":
            counts[22], counts[23] = 1, 0
        elif kind == "47,XXY":
            counts[22], counts[23] = 2, 1
        elif kind == "-k":
            k = int(rng.integers(1, 23))
            counts[k - 1] -= 1
            extras.append(f"-{k}")
        else:
            counts[int(kind[1:]) - 1] += 1
            extras.append(kind)
    sex = "X" * counts[22] + "Y" * counts[23]
    return ",".join([str(sum(counts)), sex, *extras]), tuple(counts)


def parse_karyotype(karyotype: str) -> tuple[int, ...]:
    """Copies of classes 1..24 declared by a short ISCN string such as ``47,XY,+21`` or ``45,X``."""
    parts = karyotype.split(",")
    counts = [2] * 22 + [parts[1].count("X"), parts[1].count("Y")]
    for p in parts[2:]:
        k = int(p[1:])
        counts[k - 1] += 1 if p[0] == "+" else -1
    if sum(counts) != int(parts[0]):
        raise ValueError(f"karyotype {karyotype!r}: declared total does not match the listed changes")
    return tuple(counts)


def plan_cells(cases: int, seed: int, abnormal_rate: float) -> list[CellPlan]:
    """Cells grouped on slides of one or two cells (mostly two) so slide-level splits are exercised."""
    rng = np.random.default_rng([seed, 0xCE11])
    plans: list[CellPlan] = []
    slide = 0
    while len(plans) < cases:
        per_slide = 2 if rng.random() < 0.7 else 1
        for cell_no in range(1, per_slide + 1):
            if len(plans) == cases:
                break
            karyotype, counts = cell_counts(rng, abnormal=bool(rng.random() < abnormal_rate))
            slide_id = f"syn{slide:05d}"
            case_id = f"{slide_id}.{cell_no:02d}"
            plans.append(CellPlan(len(plans), case_id, slide_id, cell_no, karyotype, counts))
        slide += 1
    return plans


def render_cell(
    rng: np.random.Generator, counts: Sequence[int], *, flip_rate: float = 0.5,
    scale: float = DEFAULT_SCALE, style: str | LabStyle | None = None,
) -> list[tuple[int, int, int, np.ndarray]]:
    """All chromosomes of one cell as ``(class_1to24, copy, polarity, image)``.

    The cell's condensation (lognormal, ~12 %) scales every chromosome; blur and contrast are
    shared by the cell with small per-chromosome changes, as on one metaphase spread. ``style``
    (a :data:`LAB_STYLES` name or a :class:`LabStyle`; default ``gband``) is
    applied after all chromosomes are rendered, so framing and noise leave the chromosomes' own
    random draws, and hence their shapes, as in the tight-crop style.
    """
    lab = resolve_style(style)[1]
    cell_scale = scale * lab.magnification * float(np.exp(rng.normal(0.0, 0.12)))
    cell_blur, cell_contrast = rng.uniform(0.55, 0.95), rng.uniform(0.85, 1.0)
    out = []
    for k in range(1, 25):
        for copy in range(counts[k - 1]):
            polarity = 0 if rng.random() < flip_rate else 1
            img = render_chromosome(
                rng, k, scale=cell_scale, stain=lab.stain, polarity=polarity,
                blur=cell_blur * rng.uniform(0.9, 1.1), contrast=cell_contrast,
                band_inversion=lab.band_inversion,
            )
            out.append((k, copy, polarity, img))
    return [(k, copy, polarity, apply_lab_style(rng, img, lab)) for k, copy, polarity, img in out]


KARYOGRAM_ROWS = (
    (1, 2, 3, 4, 5), (6, 7, 8, 9, 10, 11, 12, 23), (13, 14, 15, 16, 17, 18), (19, 20, 21, 22, 24),
)


def karyogram(
    chromosomes: Sequence[tuple[int, np.ndarray]], *, stain: str = "gband", gap: int = 6,
    label_space: int = 12,
) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Arrange ``(class_1to24, image)`` pairs in the classical karyogram rows (1-5, 6-12 X, 13-18,
    19-22 Y), bottoms aligned per row, for viewing.

    Returns the uint8 canvas and, per class, the (x, y) pixel where its label belongs (centred
    under the group, in the ``label_space`` left below each row).
    """
    bg = 255 if stain == "gband" else 0
    by_class: dict[int, list[np.ndarray]] = {}
    for k, img in chromosomes:
        by_class.setdefault(k, []).append(img)
    strips, labels, top = [], {}, 0
    for row in KARYOGRAM_ROWS:
        h = max([im.shape[0] for k in row for im in by_class.get(k, [])] + [10])
        strip_h = gap + h + label_space
        tiles, x0 = [], 0
        for k in row:
            group = by_class.get(k, [])
            w = max(sum(im.shape[1] for im in group) + gap * (len(group) - 1), 10) + 3 * gap
            tile = np.full((strip_h, w), bg, np.uint8)
            x = (w - sum(im.shape[1] + gap for im in group) + gap) // 2
            for im in group:
                tile[gap + h - im.shape[0]: gap + h, x: x + im.shape[1]] = im
                x += im.shape[1] + gap
            labels[k] = (x0 + w // 2, top + gap + h + label_space // 2)
            tiles.append(tile)
            x0 += w
        strips.append(np.concatenate(tiles, axis=1))
        top += strip_h
    width = max(s.shape[1] for s in strips)
    canvas = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=bg)
                             for s in strips])
    return canvas, labels


# --------------------------------------------------------------------------- dataset
def _write_image(path: Path, img: np.ndarray, jpeg_quality: int | None = None) -> None:
    """Encode (PNG, or JPEG at ``jpeg_quality``) in memory and write with one system call: file
    creation dominates the cost of tiny files."""
    buf = io.BytesIO()
    if jpeg_quality is None:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=jpeg_quality)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, buf.getbuffer())
    finally:
        os.close(fd)


def _write_cell(job: tuple[Path, CellPlan, int, LabStyle, float]) -> list[dict]:
    """Render one cell into ``images/<case>`` (written in a temp folder, renamed when complete)."""
    out, plan, seed, style, flip_rate = job
    rng = np.random.default_rng([seed, plan.index, 0xC0DE])
    final = out / "images" / plan.case_id
    tmp = out / "images" / f".{plan.case_id}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for k, copy, polarity, img in render_cell(rng, plan.counts, style=style, flip_rate=flip_rate):
        rel = Path("images") / plan.case_id / f"clase{k}" / f"clase{k}_{copy}_{plan.case_id}{style.suffix}"
        dest = tmp / f"clase{k}" / rel.name
        if copy == 0:
            dest.parent.mkdir(parents=True)
        _write_image(dest, img, style.jpeg_quality)
        rows.append({
            "path": rel.as_posix(), "case_id": plan.case_id, "slide_id": plan.slide_id,
            "cell_no": plan.cell_no, "class_1to24": k, "label_0to23": k - 1,
            "class_name": CHROMOSOME_TABLE[k - 1].name, "copy": copy, "height": img.shape[0],
            "width": img.shape[1], "mode": "L", "polarity": polarity, "karyotype": plan.karyotype,
        })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return rows


def generate_karyotypes(
    out: str | os.PathLike,
    *,
    cases: int,
    seed: int = 0,
    abnormal_rate: float = 0.1,
    flip_rate: float = 0.5,
    workers: int | None = None,
    progress: bool | None = None,
    style: str | LabStyle | None = None,
) -> Path:
    """Write ``cases`` synthetic cells under ``out`` in the ``pki3_gband`` layout; return the manifest.

    Layout: ``out/images/<case>/clase<k>/clase<k>_<copy>_<case>.png`` (8-bit gray) and
    ``out/manifest.csv`` with the pki3 columns plus ``polarity`` and ``karyotype``. A fraction
    ``abnormal_rate`` of cells carries a count anomaly (trisomy 21/18/13, 45,X, 47,XXY or a lost
    autosome); ``flip_rate`` of the chromosomes are stored flipped (polarity 0). The output is the
    same for a seed whatever ``workers`` is. Each cell folder appears only when complete and the
    manifest is written last, atomically.

    ``style`` names a lab look from :data:`LAB_STYLES` (default ``gband``; ``qband`` for bright on
    black) or is a :class:`LabStyle`. JPEG styles write ``.jpg`` files; ``height``/``width`` are those
    of the written files. ``out/style.json`` records the style's name and parameters.
    """
    if cases < 1:
        raise HolonsError(f"cases must be at least 1, got {cases}")
    for name, value in (("abnormal rate", abnormal_rate), ("flip rate", flip_rate)):
        if not 0.0 <= value <= 1.0:
            raise HolonsError(f"{name} must be between 0 and 1, got {value}")
    style_name, lab = resolve_style(style)
    out = Path(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HolonsError(f"cannot create output folder {out}: {e.strerror}") from e

    for stale in (out / "images").glob(".*.tmp*"):  # cell folders left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    jobs = [(out, plan, seed, lab, flip_rate) for plan in plan_cells(cases, seed, abnormal_rate)]
    workers = min(usable_cpus(), 8) if workers is None else max(1, workers)
    workers = min(workers, max(1, cases // 4))
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    rows: list[dict] = []
    with tqdm(total=cases, desc="karyotypes", unit="cell", disable=not progress) as bar:
        try:
            if workers == 1:
                for job in jobs:
                    rows.extend(_write_cell(job))
                    bar.update()
            else:
                with ProcessPoolExecutor(workers) as pool:
                    for cell_rows in pool.map(_write_cell, jobs, chunksize=4):
                        rows.extend(cell_rows)
                        bar.update()
        except OSError as e:
            raise HolonsError(f"cannot write synthetic karyotypes under {out}: {e.strerror or e}") from e

    with atomic_write(out / "style.json", "w") as f:
        json.dump({"style": style_name, **asdict(lab)}, f, indent=2)
    manifest = out / "manifest.csv"
    import pandas as pd

    with atomic_write(manifest, "w") as f:
        pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_csv(f, index=False)
    return manifest

