"""Annotated radiograph sets: images with masks per structure (and, for JSRT-like sets, landmarks).

Folder layout, read by :func:`load_annotated` (real JSRT/SCR, the built-in phantoms, or a
hospital's own masks; the ``_1024`` suffix of the real set is optional and detected)::

    ROOT/image_table.csv                          optional: one row per image (id column ``image`` or ``id``)
    ROOT/images[_1024]/<id>.<png|dcm|...>         the radiograph (phantoms: or ``dicom/<split>/<id>.dcm``)
    ROOT/masks[_1024]/<structure>/<id>.png        255 (any value > 127) inside
    ROOT/landmarks[_1024]/<RL|LL|H|RCLA|LCLA>/<id>.npy   (N, 2) float (x, y) pixels of the image frame

The structures are the sub-folders of ``masks/`` (JSRT's five in their usual order first, any
other name after them, sorted), so a lungs-only set (``masks/lungs/``) is as valid as JSRT's five.
Without ``image_table.csv`` the ids are the image files' stems and every image is in split ``all``.
The split column is ``hybridgnet_split`` (JSRT: train / val) or ``split`` (phantoms: train / val /
test).

A manifest CSV (:func:`load_segmentation_set`) is the other way to name masks: a ``path`` column
(the image) and one column per structure holding its mask file (relative paths are relative to the
CSV's folder), optionally ``split``.

Landmarks follow the pixel-centre convention (pixel ``i`` spans ``[i - 0.5, i + 0.5]``);
:func:`landmarks_to_canvas` / :func:`landmarks_to_source` move them through a preprocessing
:class:`~holons.data.preprocess.Geometry` (whose origin is the top-left pixel's corner).

:class:`LocalizationSet` (findings with boxes, for CAM localization) is read from the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from holons.data.formats import detect_format
from holons.data.preprocess import Geometry
from holons.data.readers import read_image
from holons.data.weak_labels import JSRT_PIXEL_MM, circle_box, mask_box
from holons.errors import HolonsError

__all__ = [
    "STRUCTURES", "LANDMARK_KEYS", "DataLayoutError", "AnnotatedRadiographs", "load_annotated",
    "SegmentationSet", "load_segmentation_set", "read_mask", "landmarks_to_canvas", "landmarks_to_source",
    "LocalizationSet", "load_localization_set",
]

STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
"""JSRT/SCR's five structures (and the phantoms'); the landmarks come in these."""
LANDMARK_KEYS = {"right_lung": "RL", "left_lung": "LL", "heart": "H", "right_clavicle": "RCLA",
                 "left_clavicle": "LCLA"}
_ID_COLUMNS = ("image", "id")
_SPLIT_COLUMNS = ("hybridgnet_split", "split")
_PATIENT_COLUMNS = ("patient_id", "patientid")


class DataLayoutError(HolonsError):
    """A data folder that is not an annotated radiograph set in the expected layout."""


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file (PNG or any 8-bit image) as bool ``H x W``: inside where the value is > 127."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 127
    except (OSError, ValueError) as e:
        raise DataLayoutError(f"unreadable mask {path}: {e}") from e


def _ordered_structures(names: list[str]) -> tuple[str, ...]:
    known = [s for s in STRUCTURES if s in names]
    return tuple(known + sorted(set(names) - set(known)))


@dataclass
class AnnotatedRadiographs:
    """An annotated set: the image table plus where images, masks and landmarks live.

    ``table`` has at least the columns ``id``, ``split`` and ``patient`` (the image's own id
    where the set has no patient column); ``structures`` are the mask folders' names.
    """

    root: Path
    table: pd.DataFrame
    image_dirs: tuple[Path, ...]
    mask_dir: Path | None
    landmark_dir: Path | None
    structures: tuple[str, ...] = ()
    _image_files: dict[str, Path] = field(default_factory=dict, repr=False)

    def ids(self, split: str | None = None) -> list[str]:
        """Image ids, optionally of one split, in table order."""
        t = self.table if split is None else self.table[self.table["split"] == split]
        return t["id"].tolist()

    @property
    def splits(self) -> list[str]:
        return sorted(self.table["split"].dropna().unique().tolist())

    def default_eval_split(self) -> str | None:
        """The held-out split used for evaluation: ``test`` where present, else ``val``, else all images."""
        for name in ("test", "val"):
            if name in self.splits:
                return name
        return None

    def patient(self, image_id: str) -> str:
        return str(self.table.loc[self.table["id"] == image_id, "patient"].iloc[0])

    def image_path(self, image_id: str) -> Path:
        if not self._image_files:
            for d in reversed(self.image_dirs):  # earlier folders win; phantom DICOMs sit in dicom/<split>/
                for p in sorted(d.rglob("*")):
                    if p.is_file() and not p.name.startswith("."):
                        self._image_files[p.stem] = p
        path = self._image_files.get(image_id)
        if path is None:
            raise DataLayoutError(f"no image file for {image_id} in {', '.join(map(str, self.image_dirs))}")
        return path

    def read(self, image_id: str) -> np.ndarray:
        """The image at its own resolution, float32 H x W in [0, 1]."""
        return read_image(self.image_path(image_id)).pixels

    def landmarks(self, image_id: str) -> dict[str, np.ndarray]:
        """Landmarks per structure (``N x 2`` float64 (x, y)) in the image's own frame."""
        if self.landmark_dir is None:
            raise DataLayoutError(f"{self.root} has no landmarks folder")
        out = {}
        for s in STRUCTURES:
            path = self.landmark_dir / LANDMARK_KEYS[s] / f"{image_id}.npy"
            if not path.is_file():
                raise DataLayoutError(f"missing landmarks {LANDMARK_KEYS[s]} for {image_id}")
            pts = np.load(path, allow_pickle=False).astype(np.float64)
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise DataLayoutError(f"landmarks {path.name} of {s}: expected N x 2, got {pts.shape}")
            out[s] = pts
        return out

    def mask_path(self, image_id: str, structure: str) -> Path:
        if self.mask_dir is None:
            raise DataLayoutError(f"{self.root} has no masks folder")
        return self.mask_dir / structure / f"{image_id}.png"

    def masks(self, image_id: str, structures: tuple[str, ...] | list[str] | None = None) -> np.ndarray:
        """Masks of ``structures`` (default: all of the set's), bool ``S x H x W`` in the image's frame."""
        planes = []
        for s in self.structures if structures is None else structures:
            path = self.mask_path(image_id, s)
            if not path.is_file():
                raise DataLayoutError(f"missing {s} mask for {image_id}")
            planes.append(read_mask(path))
        return np.stack(planes)


def _table_from_images(root: Path, image_dirs: tuple[Path, ...]) -> pd.DataFrame:
    ids = sorted({p.stem for d in image_dirs for p in d.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and detect_format(p) is not None})
    if not ids:
        raise DataLayoutError(f"{root} has no image files under {', '.join(map(str, image_dirs))}")
    return pd.DataFrame({"id": ids, "split": "all", "patient": ids})


def load_annotated(root: str | Path) -> AnnotatedRadiographs:
    """Open an annotated radiograph set (module docstring); ``DataLayoutError`` when it is not one."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{root} is not a folder (expected an annotated radiograph set)")
    image_dirs = tuple(d for d in (_first_dir(root, ("images_1024", "images")), _first_dir(root, ("dicom",)))
                       if d is not None)
    if not image_dirs:
        raise DataLayoutError(f"{root} has no images folder (images/ or images_1024/)")
    table_path = root / "image_table.csv"
    if table_path.is_file():
        raw = pd.read_csv(table_path, dtype=str, keep_default_na=False)
        id_col = next((c for c in _ID_COLUMNS if c in raw.columns), None)
        if id_col is None:
            raise DataLayoutError(f"{table_path} has no image id column ({' or '.join(_ID_COLUMNS)})")
        split_col = next((c for c in _SPLIT_COLUMNS if c in raw.columns), None)
        patient_col = next((c for c in _PATIENT_COLUMNS if c in raw.columns), None)
        table = raw.copy()
        table["id"] = raw[id_col]
        table["split"] = raw[split_col] if split_col else "all"
        table["patient"] = raw[patient_col] if patient_col else raw[id_col]
    else:
        table = _table_from_images(root, image_dirs)
    mask_dir = _first_dir(root, ("masks_1024", "masks"))
    structures = () if mask_dir is None else _ordered_structures(
        [d.name for d in mask_dir.iterdir() if d.is_dir() and not d.name.startswith(".")])
    return AnnotatedRadiographs(
        root=root, table=table.reset_index(drop=True), image_dirs=image_dirs, mask_dir=mask_dir,
        landmark_dir=_first_dir(root, ("landmarks_1024", "landmarks")), structures=structures,
    )


@dataclass
class SegmentationSet:
    """Images with one mask file per structure: ``masks[i][k]`` is image ``i``'s mask of structure ``k``;
    ``split`` holds ``train`` / ``val`` / ``test`` / ``all`` per image."""

    ids: list[str]
    paths: list[Path]
    masks: list[list[Path]]
    structures: tuple[str, ...]
    split: np.ndarray

    def read_masks(self, i: int) -> np.ndarray:
        """Image ``i``'s masks, bool ``S x H x W`` in the source image's frame."""
        return np.stack([read_mask(p) for p in self.masks[i]])


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def load_segmentation_set(data: str | Path) -> SegmentationSet:
    """A folder in the annotated layout, or a manifest CSV (``path`` + one mask column per structure,
    optional ``split``); see the module docstring."""
    data = Path(data)
    if data.is_file():
        table = pd.read_csv(data, dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise DataLayoutError(f"{data}: a segmentation manifest needs a 'path' column "
                                  "(the image) and one column per structure (its mask file)")
        structures = tuple(c for c in table.columns if c not in ("path", "split", "id"))
        if not structures:
            raise DataLayoutError(f"{data}: no structure columns next to 'path' "
                                  "(one mask file per structure)")
        if table.empty:
            raise DataLayoutError(f"{data} lists no images")
        paths = [_resolve(data.parent, p) for p in table["path"]]
        masks = [[_resolve(data.parent, row[s]) for s in structures] for _, row in table.iterrows()]
        split = table["split"].to_numpy() if "split" in table.columns else np.full(len(table), "all")
        return SegmentationSet(ids=[p.stem for p in paths], paths=paths, masks=masks, structures=structures,
                               split=np.asarray(split, dtype=object))
    annotated = load_annotated(data)
    if not annotated.structures:
        raise DataLayoutError(f"{data} has no masks/<structure>/ folders")
    ids = annotated.ids()
    return SegmentationSet(
        ids=ids, paths=[annotated.image_path(i) for i in ids],
        masks=[[annotated.mask_path(i, s) for s in annotated.structures] for i in ids],
        structures=annotated.structures, split=annotated.table["split"].to_numpy(dtype=object))


def landmarks_to_canvas(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(x, y) pixel-centre coordinates of the source image -> the same convention on the canvas."""
    return geometry.from_source(np.asarray(points, dtype=np.float64) + 0.5) - 0.5


def landmarks_to_source(points: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(x, y) pixel-centre coordinates of the canvas -> the same convention on the source image."""
    return geometry.to_source(np.asarray(points, dtype=np.float64) + 0.5) - 0.5


@dataclass
class LocalizationSet:
    """Images with binary findings (``labels``: ``N x T``) and each positive's ground-truth boxes, read on
    demand in the image's own frame (``boxes(task, i)``: ``K x 4`` (x0, y0, x1, y1), pixel centres).

    Sets: phantoms (``nodule`` box from ``nodule_x / nodule_y / nodule_size``, ``cardiomegaly`` box of
    the heart mask) and JSRT (``nodule``: centre in the 1024 px frame, diameter ``nodule_size_mm`` /
    0.35 mm)."""

    name: str
    data: AnnotatedRadiographs
    ids: list[str]
    tasks: list[str]
    labels: np.ndarray
    split: np.ndarray  # "train" | "test" per image

    def boxes(self, task: str, i: int) -> np.ndarray:
        row = self.data.table.loc[self.data.table["id"] == self.ids[i]].iloc[0]
        if task == "cardiomegaly":
            return mask_box(self.data.masks(self.ids[i], ["heart"])[0])
        if self.name == "jsrt":
            return circle_box(float(row["nodule_x_1024"]), float(row["nodule_y_1024"]),
                              float(row["nodule_size_mm"]) / JSRT_PIXEL_MM)
        return circle_box(float(row["nodule_x"]), float(row["nodule_y"]), float(row["nodule_size"]))


def _flag(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").fillna(0).astype(int).to_numpy() > 0


def load_localization_set(root: str | Path) -> LocalizationSet:
    """Open a phantom set or JSRT at ``root`` with its located findings (see :class:`LocalizationSet`)."""
    data = load_annotated(root)
    t = data.table
    if {"nodule", "nodule_x", "cardiomegaly"} <= set(t.columns):
        test = data.default_eval_split()
        t = t[t["split"].isin(["train", test])]
        name, tasks = "phantoms", ["nodule", "cardiomegaly"]
        labels = np.stack([_flag(t["nodule"]), _flag(t["cardiomegaly"])], axis=1)
    elif {"has_nodule", "nodule_x_1024", "nodule_size_mm"} <= set(t.columns):
        t = t[t["split"].isin(["train", "val"])]
        name, tasks = "jsrt", ["nodule"]
        labels = _flag(t["has_nodule"])[:, None]
    else:
        raise HolonsError(f"{root} has no findings with locations (phantoms: nodule_x, cardiomegaly; "
                          "JSRT: has_nodule, nodule_x_1024)")
    return LocalizationSet(name=name, data=data, ids=t["id"].tolist(), tasks=tasks, labels=labels.astype(int),
                           split=np.where(t["split"].to_numpy() == "train", "train", "test"))
