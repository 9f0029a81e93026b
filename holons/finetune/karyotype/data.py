"""Chromosome images as fixed-size tensors: manifests, the recorded preprocessing, flips and small
affine jitter, group splits.

Each chromosome is cut out of its file by :mod:`holons.finetune.karyotype.preprocess` (one
convention for every stain: bright on a 0 background, intensity in the foreground's own range),
centred on a square canvas *without stretching* (a chromosome's length is a class cue) and the
canvas resized to the network's input size. The canvas side comes from the training chromosomes
(a high percentile of their lengths) and is stored with the model as part of its
:class:`~holons.finetune.karyotype.preprocess.Preprocessing`, so prediction puts new images on the
same canvas.

Labels: type 0..23 (autosomes 1..22 -> 0..21, X -> 22, Y -> 23); polarity 1 when the long arm
points down (as stored in ``pki3_gband`` and karyogram-style crops), 0 when flipped, -1 unknown.
A vertical flip swaps polarity; a horizontal flip keeps both labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from holons.data.readers import UnreadableImage, read_image
from holons.data.splits import assign_splits, group_kfold, group_split  # noqa: F401  (re-exported)
from holons.errors import HolonsError
from holons.finetune.karyotype.preprocess import (
    ChromosomeImageError,
    Preprocessing,
    cell_scale_factors,
    choose_canvas,
    chromosome_crop,
    crop_length,
    network_input,
    reference_length,
)

NUM_TYPES = 24
CLASS_NAMES = tuple([str(k) for k in range(1, 23)] + ["X", "Y"])
"""Display name of each type 0..23."""
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
FOREGROUND_THRESHOLD = 0.1
"""Pixels above this (in the network input) are chromosome: box targets, CutMix label mixing."""


class KaryotypeDataError(HolonsError):
    """A manifest or image folder that cannot be used for karyotyping."""


# --------------------------------------------------------------------------- manifests
def read_karyotype_manifest(path: str | Path, *, default_polarity: int = 1) -> tuple[pd.DataFrame, dict]:
    """Read a manifest CSV (pki-3, karyonet or synthetic layout) into one normalised table.

    Columns of the result: ``path`` (as written), ``file`` (absolute), ``case_id``, ``group``
    (``slide_id`` when present, else the case), ``label`` (0..23, -1 when unlabelled),
    ``polarity`` (1/0, ``default_polarity`` when the manifest has none), and ``height``/``width``
    when the manifest has them. Labels are read from ``label_0to23``, else ``class_1to24``, else
    ``label``. Rows with a label outside 1..24 are dropped and counted in the returned dict.
    """
    path = Path(path)
    if not path.is_file():
        raise KaryotypeDataError(f"manifest not found: {path}")
    try:
        raw = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise KaryotypeDataError(f"{path}: not a readable CSV manifest ({type(e).__name__})") from e
    if "path" not in raw.columns:
        raise KaryotypeDataError(f"{path}: manifest needs a 'path' column (has: {', '.join(raw.columns)})")
    root = path.parent
    out = pd.DataFrame({"path": raw["path"].astype(str)})
    out["file"] = [str(p if Path(p).is_absolute() else root / p) for p in out["path"]]
    if "case_id" in raw.columns:
        out["case_id"] = raw["case_id"].astype(str)
    else:
        out["case_id"] = [Path(p).parent.name for p in out["path"]]
    out["group"] = raw["slide_id"].astype(str) if "slide_id" in raw.columns else out["case_id"]
    if "label_0to23" in raw.columns:
        label = pd.to_numeric(raw["label_0to23"], errors="coerce")
    elif "class_1to24" in raw.columns:
        label = pd.to_numeric(raw["class_1to24"], errors="coerce") - 1
    elif "label" in raw.columns:
        label = pd.to_numeric(raw["label"], errors="coerce")
    else:
        label = pd.Series(-1, index=raw.index)
    if "polarity" in raw.columns:
        polarity = pd.to_numeric(raw["polarity"], errors="coerce").fillna(-1)
    else:
        polarity = pd.Series(default_polarity, index=raw.index)
    labelled = label.notna() & (label != -1)
    bad = labelled & ~label.between(0, NUM_TYPES - 1)
    if "class_1to24" in raw.columns:
        k = pd.to_numeric(raw["class_1to24"], errors="coerce")
        bad |= k.notna() & ~k.between(1, NUM_TYPES)
        bad |= labelled & k.notna() & (k - 1 != label)
    out["label"] = label.fillna(-1).astype(int)
    out["polarity"] = polarity.astype(int).where(polarity.isin([0, 1]), -1)
    for col in ("height", "width"):
        if col in raw.columns:
            out[col] = pd.to_numeric(raw[col], errors="coerce")
    skipped = {"label outside 1..24": int(bad.sum())} if bad.any() else {}
    return out[~bad].reset_index(drop=True), skipped


def folder_manifest(folder: str | Path) -> pd.DataFrame:
    """A normalised, unlabelled table of the images under ``folder``.

    The case of an image is its first folder below ``folder`` (one folder per cell), or the
    folder's own name for images directly inside it.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KaryotypeDataError(f"no chromosome images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    rel = [p.relative_to(folder) for p in files]
    cases = [r.parts[0] if len(r.parts) > 1 else folder.name for r in rel]
    return pd.DataFrame({
        "path": [r.as_posix() for r in rel], "file": [str(p) for p in files], "case_id": cases,
        "group": cases, "label": -1, "polarity": -1,
    })


def load_table(data: str | Path, *, default_polarity: int = 1) -> tuple[pd.DataFrame, dict]:
    """A manifest CSV or a folder of images, as :func:`read_karyotype_manifest` returns it."""
    data = Path(data)
    if data.is_dir():
        return folder_manifest(data), {}
    return read_karyotype_manifest(data, default_polarity=default_polarity)


# --------------------------------------------------------------------------- pixels
def read_crop(path: str | Path, stain: str) -> np.ndarray:
    """Read one file and cut its chromosome out (:func:`preprocess.chromosome_crop`); raises
    ``UnreadableImage`` or ``ChromosomeImageError``."""
    return chromosome_crop(read_image(path).pixels, stain)


@dataclass
class Crops:
    """The chromosomes of a table, cut out of their files once (uint8, bright on 0).

    ``table`` keeps only the rows that loaded; ``skipped`` lists ``(file, reason)`` of the others.
    """

    table: pd.DataFrame
    crops: list[np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([crop_length(c) for c in self.crops], float)

    def subset(self, rows: np.ndarray) -> Crops:
        """The crops of the boolean or index selection ``rows`` of ``table``."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return Crops(self.table.iloc[idx].reset_index(drop=True), [self.crops[i] for i in idx])


def read_crops(table: pd.DataFrame, stain: str, *, progress: bool = False) -> Crops:
    """Cut every chromosome of ``table`` out of its file; unreadable files are reported, not fatal."""
    from tqdm import tqdm

    crops, keep, skipped = [], [], []
    for i, file in enumerate(tqdm(table["file"], desc="chromosomes", unit="img", disable=not progress)):
        try:
            crop = read_crop(file, stain)
        except UnreadableImage as e:
            skipped.append((str(file), e.reason))
            continue
        except ChromosomeImageError as e:
            skipped.append((str(file), str(e)))
            continue
        crops.append(np.round(crop * 255).astype(np.uint8))
        keep.append(i)
    return Crops(table.iloc[keep].reset_index(drop=True), crops, skipped)


def fit_preprocessing(train: Crops, *, stain: str, canvas: int = 0, percentile: float = 99.5,
                      scale: str = "none") -> Preprocessing:
    """The preprocessing a model records, chosen on its training chromosomes: the canvas from a
    high percentile of their lengths (after per-cell scaling when ``scale == "cell"``)."""
    if not train.crops:
        raise KaryotypeDataError("no training chromosomes to choose the canvas from")
    lengths = train.lengths
    reference = 0.0
    if scale == "cell":
        reference = reference_length(lengths, train.table["case_id"])
        lengths = lengths * cell_scale_factors(lengths, train.table["case_id"], reference)
    return Preprocessing(stain=stain, canvas=int(canvas) or choose_canvas(lengths, percentile),
                         scale=scale, reference_length=round(reference, 3), canvas_percentile=percentile)


# --------------------------------------------------------------------------- dataset
@dataclass
class LoadReport:
    """What preloading did: images kept, shrunk to fit the canvas, and skipped (with reasons)."""

    kept: int = 0
    shrunk: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


class KaryotypeDataset(Dataset):
    """Chromosomes as uint8 ``size x size`` network inputs, made once by the recorded
    :class:`Preprocessing` (the same at training and predict time).

    Build it from a table (files are read) or from :class:`Crops` already read. Items are dicts:
    ``image`` (1 x S x S float in [0, 1]), ``label``, ``polarity``, ``index`` (row of ``table``).
    """

    def __init__(self, data: pd.DataFrame | Crops, *, preprocessing: Preprocessing, size: int,
                 progress: bool = False) -> None:
        crops = data if isinstance(data, Crops) else read_crops(data, preprocessing.stain, progress=progress)
        self.preprocessing, self.canvas, self.size = preprocessing, int(preprocessing.canvas), int(size)
        self.table = crops.table
        self.report = LoadReport(kept=len(crops.crops), skipped=list(crops.skipped))
        factors = np.ones(len(crops.crops))
        if preprocessing.scale == "cell" and crops.crops:
            factors = cell_scale_factors(crops.lengths, self.table["case_id"], preprocessing.reference_length)
        images = []
        for crop, factor in zip(crops.crops, factors, strict=True):
            x, shrunk = network_input(crop.astype(np.float32) / 255.0, self.canvas, self.size, factor)
            images.append(np.round(x * 255).astype(np.uint8))
            self.report.shrunk += int(shrunk)
        stacked = np.stack(images)[:, None] if images else np.zeros((0, 1, size, size), np.uint8)
        self.images = torch.from_numpy(stacked)
        self.labels = torch.tensor(self.table["label"].to_numpy(), dtype=torch.long)
        self.polarity = torch.tensor(self.table["polarity"].to_numpy(), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].float() / 255.0, "label": self.labels[i],
                "polarity": self.polarity[i], "index": i}


# --------------------------------------------------------------------------- flips
def flip_vertical(images: torch.Tensor, polarity: torch.Tensor, mask: torch.Tensor | None = None):
    """Flip ``images`` (N x C x H x W) upside down where ``mask`` (all when None); polarity swaps
    (1 <-> 0), unknown polarity (-1) stays unknown."""
    if mask is None:
        mask = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    flipped = torch.where(mask[:, None, None, None], images.flip(-2), images)
    swapped = torch.where(mask & (polarity >= 0), 1 - polarity, polarity)
    return flipped, swapped


def random_flips(images: torch.Tensor, polarity: torch.Tensor, generator: torch.Generator,
                 hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical flip with p = 1/2 (polarity swapped) and, with ``hflip``, a horizontal flip with
    p = 1/2 (labels kept): the augmentation that teaches polarity from upright data.

    Flip policy: chromosomes have no laterality (a mirrored chromosome is the same type with the same
    polarity), so training mirrors them by default (``train.hflip: true``); the vertical flip is a
    label change, not an invariance."""
    u = torch.rand(images.shape[0], 2, generator=generator).to(images.device)
    images, polarity = flip_vertical(images, polarity, u[:, 0] < 0.5)
    if hflip:
        images = torch.where((u[:, 1] < 0.5)[:, None, None, None], images.flip(-1), images)
    return images, polarity


def random_affine(images: torch.Tensor, generator: torch.Generator, *, degrees: float = 0.0,
                  translate: float = 0.0, scale: float = 0.0) -> torch.Tensor:
    """Per image: a rotation by up to +-``degrees`` about the centre, an isotropic scale by
    1 +- ``scale`` and a shift by up to +-``translate`` of the side, background (0) filled.

    Small pose changes of a chromosome on its canvas (bent or tilted arms, slightly different
    condensation) that keep its type and polarity; the magnitudes are uniform draws from
    ``generator``, so a resumed run repeats them.
    """
    n = images.shape[0]
    u = (torch.rand(n, 4, generator=generator) * 2 - 1).to(images.device, images.dtype)
    angle = u[:, 0] * math.radians(degrees)
    zoom = 1.0 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = u[:, 2:] * (2.0 * translate)  # normalized coordinates span 2 per side
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
