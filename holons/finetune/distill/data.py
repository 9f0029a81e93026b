"""The real sets distillation reads, and the distilled set it writes.

Real sets become uint8 tensors ``N x 1 x S x S`` (bright = chromosome / dense tissue on 0) with a
train / test split:

- **karyotype** manifests (pki-3, karyonet, ``holons synth karyotypes``; 24 types): read, split by
  slide and prepared by karyotyping's own :func:`~holons.finetune.karyotype.train.prepare_data`
  (the crop, the canvas fitted on the training chromosomes, the resize), so the distilled images
  live in the frame a karyotype model sees. The test split is karyotyping's fixed one.
- **classification** sets: an ``image_table.csv`` set (built-in phantoms, JSRT: ``split`` or
  ``hybridgnet_split``; test = ``test``, else ``val``) with a label column, or a ``path,label`` CSV
  (split from its ``split`` column, else by ``group`` / path, seeded). Images go through
  :class:`holons.data.preprocess.Preprocessing`.

The distilled set is written as PNGs plus a ``manifest.csv``: for chromosomes with the columns of
the synthetic karyotype manifests (one pseudo-cell ``distilled_<j>`` per image index ``j``, each
holding one image of every type; dark on light like G-band files, polarity unknown), which
``holons karyotype train`` reads; for classification a generic ``path,label`` manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from holons.data.image import UnreadableImage
from holons.data.preprocess import Preprocessing
from holons.data.splits import group_split
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.distill.config import DistillDataConfig

KARYOTYPE, CLASSIFICATION = "karyotype", "classification"
LABEL_COLUMNS = ("has_nodule", "nodule")
"""Label columns of an ``image_table.csv`` tried in order when ``data.label`` is empty."""


@dataclass
class RealSet:
    """A labelled set as network inputs: uint8 ``N x 1 x S x S`` images, labels 0..C-1, per split."""

    kind: str
    class_names: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_indices(self) -> list[torch.Tensor]:
        """Per class, the indices of its training images."""
        return [torch.nonzero(self.train_y == c).flatten() for c in range(self.num_classes)]


def detect_kind(data: str | Path) -> str:
    """``karyotype`` for a chromosome manifest (``class_1to24`` / ``label_0to23`` columns), else
    ``classification``."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        columns = set(pd.read_csv(data, nrows=0).columns)
        if {"class_1to24", "label_0to23"} & columns:
            return KARYOTYPE
    return CLASSIFICATION


def load_real_set(cfg: DistillDataConfig, data: str | Path, *, progress: bool = False) -> RealSet:
    """The real set at ``data`` (a manifest CSV or a set folder), as ``cfg`` prepares it."""
    kind = detect_kind(data) if cfg.kind == "auto" else cfg.kind
    if kind == KARYOTYPE:
        return _karyotype_set(cfg, data, progress)
    return _classification_set(cfg, Path(data), progress)


def _karyotype_set(cfg: DistillDataConfig, manifest: str | Path, progress: bool) -> RealSet:
    from holons.finetune.karyotype.config import KaryotypeConfig, KaryotypeDataConfig
    from holons.finetune.karyotype.data import CLASS_NAMES
    from holons.finetune.karyotype.train import prepare_data

    kcfg = KaryotypeConfig(data=KaryotypeDataConfig(
        stain=cfg.stain, canvas=cfg.canvas, input_size=cfg.size, test_fraction=cfg.test_fraction,
        val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, max_train_cases=cfg.max_train_cases))
    prepared = prepare_data(kcfg, manifest, progress=progress)
    scored = prepared.val if cfg.eval_split == "val" else prepared.test
    if len(scored) == 0:
        raise HolonsError(f"{manifest}: the {cfg.eval_split} split is empty (data.val_fraction / "
                          "data.test_fraction)")
    info = {"preprocessing": prepared.preprocessing.to_json(), "skipped": prepared.skipped,
            "val_chromosomes": len(prepared.val), "eval_split": cfg.eval_split}
    return RealSet(KARYOTYPE, list(CLASS_NAMES), prepared.train.images, prepared.train.labels,
                   scored.images, scored.labels, info)


def _first(columns, names) -> str | None:
    return next((c for c in names if c in columns), None)


def _table_rows(root: Path, label: str, eval_split: str = "test") -> pd.DataFrame:
    """``file, label, split, group`` of an ``image_table.csv`` set; the scored rows: ``test``, else
    ``val`` (``eval_split=val``: ``val`` only)."""
    t = pd.read_csv(root / "image_table.csv", dtype=str, keep_default_na=False)
    label_col = label or _first(t.columns, LABEL_COLUMNS)
    id_col, split_col = _first(t.columns, ("image", "id")), _first(t.columns, ("split", "hybridgnet_split"))
    if not label_col or label_col not in t.columns or id_col is None or split_col is None:
        raise HolonsError(f"{root / 'image_table.csv'} needs an image id, a split and a label column "
                          f"({label or ' or '.join(LABEL_COLUMNS)})")
    test = "test" if eval_split == "test" and (t[split_col] == "test").any() else "val"
    if not (t[split_col] == test).any():
        raise HolonsError(f"{root / 'image_table.csv'} has no '{test}' rows to evaluate on")
    t = t[t[split_col].isin(["train", test])]
    folders = [root / d for d in ("images_1024", "images") if (root / d).is_dir()]

    def file_of(row) -> Path:
        if str(row.get("image_path", "")):
            return root / row["image_path"]
        for folder in folders:
            found = sorted(folder.glob(f"{row[id_col]}.*"))
            if found:
                return found[0]
        raise HolonsError(f"no image file for {row[id_col]} under {root}")

    group_col = _first(t.columns, ("patient_id", "patientid")) or id_col
    return pd.DataFrame({"file": [file_of(r) for _, r in t.iterrows()], "label": t[label_col].to_numpy(),
                         "split": np.where(t[split_col] == "train", "train", "test"),
                         "group": t[group_col].to_numpy()})


def _manifest_rows(manifest: Path, cfg: DistillDataConfig) -> pd.DataFrame:
    """``file, label, split, group`` of a ``path,label[,split][,group]`` CSV."""
    m = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    label_col = cfg.label or "label"
    if "path" not in m.columns or label_col not in m.columns:
        raise HolonsError(f"{manifest} needs 'path' and '{label_col}' columns (has: {', '.join(m.columns)})")
    files = [Path(p) if Path(p).is_absolute() else manifest.parent / p for p in m["path"]]
    groups = m["group"] if "group" in m.columns else m["path"]
    if "split" in m.columns:
        split = np.where(m["split"] == "train", "train", np.where(m["split"] == "test", "test", "drop"))
    else:
        split = group_split(groups, test_fraction=cfg.test_fraction, val_fraction=0.0, seed=cfg.split_seed)
    rows = pd.DataFrame({"file": files, "label": m[label_col].to_numpy(), "split": split, "group": groups})
    return rows[rows["split"] != "drop"]


def _classification_set(cfg: DistillDataConfig, data: Path, progress: bool) -> RealSet:
    if data.is_dir() and (data / "image_table.csv").is_file():
        rows = _table_rows(data, cfg.label, cfg.eval_split)
    elif data.is_file():
        if cfg.eval_split == "val":
            raise HolonsError(f"{data}: a path,label CSV has no validation split; data.eval_split=val "
                              "needs a karyotype manifest or an image_table.csv set")
        rows = _manifest_rows(data, cfg)
    else:
        raise HolonsError(f"{data} is neither a set folder with image_table.csv nor a path,label CSV")
    prep = Preprocessing(size=cfg.size, resize=cfg.resize, voi=cfg.voi)
    images, keep = [], []
    for i, file in enumerate(tqdm(rows["file"], desc="images", disable=not progress)):
        try:
            images.append(np.round(prep.read(file)[0] * 255).astype(np.uint8))
            keep.append(i)
        except UnreadableImage:
            continue
    unreadable = len(rows) - len(keep)
    rows = rows.iloc[keep]
    class_names = sorted(rows["label"].unique().tolist())
    if len(class_names) < 2:
        raise HolonsError(f"{data}: distillation needs at least two classes, found {class_names}")
    x = torch.from_numpy(np.stack(images))[:, None]
    y = torch.tensor([class_names.index(v) for v in rows["label"]], dtype=torch.long)
    train = torch.tensor((rows["split"] == "train").to_numpy())
    return RealSet(CLASSIFICATION, class_names, x[train], y[train], x[~train], y[~train],
                   {"preprocessing": prep.to_dict(), "unreadable": unreadable})


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] as the uint8 values a PNG stores."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def write_distilled(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], kind: str,
                    folder: str | Path) -> Path:
    """Write the distilled set (uint8 ``N x 1 x S x S``) as PNGs + ``manifest.csv``; returns the manifest."""
    from holons.data.synthetic.karyotypes import MANIFEST_COLUMNS

    folder = Path(folder)
    rows = []
    counts: dict[int, int] = {}
    for image, label in zip(images, labels.tolist(), strict=True):
        j = counts.get(label, 0)
        counts[label] = j + 1
        pixels = image[0].numpy()
        if kind == KARYOTYPE:
            case, k = f"distilled_{j:03d}", label + 1
            rel = Path("images") / case / f"clase{k}" / f"clase{k}_0_{case}.png"
            pixels = 255 - pixels  # dark on light, as G-band files are stored
            rows.append({"path": rel.as_posix(), "case_id": case, "slide_id": case, "cell_no": j,
                         "class_1to24": k, "label_0to23": label, "class_name": class_names[label], "copy": 0,
                         "height": pixels.shape[0], "width": pixels.shape[1], "mode": "L", "polarity": -1,
                         "karyotype": ""})
        else:
            rel = Path("images") / _safe(class_names[label]) / f"{j:04d}.png"
            rows.append({"path": rel.as_posix(), "label": class_names[label]})
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / rel)
    columns = list(MANIFEST_COLUMNS) if kind == KARYOTYPE else ["path", "label"]
    manifest = folder / "manifest.csv"
    with atomic_write(manifest, "w") as f:
        pd.DataFrame(rows, columns=columns).to_csv(f, index=False)
    return manifest


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "_"
