"""One reader for annotated chest radiograph sets in the JSRT/SCR layout (real JSRT and our phantoms).

Layout (the ``_1024`` suffix of the real set is optional; it is detected)::

    ROOT/image_table.csv                          one row per image (id column ``image`` or ``id``)
    ROOT/images[_1024]/<id>.<png|...>             the radiograph (phantoms: or ``dicom/<split>/<id>.dcm``)
    ROOT/masks[_1024]/<structure>/<id>.png        255 inside
    ROOT/landmarks[_1024]/<RL|LL|H|RCLA|LCLA>/<id>.npy   (N, 2) float (x, y) pixels of the image frame

The split column is ``hybridgnet_split`` (JSRT: train / val) or ``split`` (phantoms: train / val /
test). Coordinates follow the pixel-centre convention (pixel ``i`` spans ``[i - 0.5, i + 0.5]``),
so resizing from ``W`` to ``S`` maps ``x`` to ``(x + 0.5) * S / W - 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from holons.data.readers import read_image
from holons.errors import HolonsError

__all__ = [
    "STRUCTURES", "LANDMARK_KEYS", "AnnotatedRadiographs", "load_annotated", "resize_image",
    "resize_mask", "scale_points",
]

STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
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


@dataclass
class AnnotatedRadiographs:
    """An annotated set: the image table plus where images, masks and landmarks live.

    ``table`` has at least the columns ``id``, ``split`` and ``patient`` (the image's own id
    where the set has no patient column).
    """

    root: Path
    table: pd.DataFrame
    image_dirs: tuple[Path, ...]
    mask_dir: Path | None
    landmark_dir: Path | None
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

    def masks(self, image_id: str) -> np.ndarray:
        """Masks of all ``STRUCTURES``, bool ``S x H x W`` in the image's own frame."""
        if self.mask_dir is None:
            raise DataLayoutError(f"{self.root} has no masks folder")
        planes = []
        for s in STRUCTURES:
            path = self.mask_dir / s / f"{image_id}.png"
            if not path.is_file():
                raise DataLayoutError(f"missing {s} mask for {image_id}")
            with Image.open(path) as im:
                planes.append(np.asarray(im.convert("L")) > 127)
        return np.stack(planes)


def load_annotated(root: str | Path) -> AnnotatedRadiographs:
    """Open an annotated radiograph set (JSRT/SCR or phantoms); ``DataLayoutError`` when it is not one."""
    root = Path(root)
    table_path = root / "image_table.csv"
    if not table_path.is_file():
        raise DataLayoutError(f"{root} has no image_table.csv (expected a JSRT/SCR-style annotated set)")
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
    image_dirs = tuple(d for d in (_first_dir(root, ("images_1024", "images")), _first_dir(root, ("dicom",)))
                       if d is not None)
    if not image_dirs:
        raise DataLayoutError(f"{root} has no images folder (images/ or images_1024/)")
    return AnnotatedRadiographs(
        root=root, table=table.reset_index(drop=True), image_dirs=image_dirs,
        mask_dir=_first_dir(root, ("masks_1024", "masks")),
        landmark_dir=_first_dir(root, ("landmarks_1024", "landmarks")),
    )


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a H x W image to ``size x size`` (bilinear, antialiased), float32."""
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    if t.shape[-2:] == (size, size):
        return t[0, 0].numpy().copy()
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0, 0].numpy()


def resize_mask(masks: np.ndarray, size: int) -> np.ndarray:
    """Resize bool masks (``... x H x W``) to ``size x size`` by area averaging, then > 0.5."""
    t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    lead = t.shape[:-2]
    t = t.reshape(1, -1, *t.shape[-2:])
    out = F.interpolate(t, size=(size, size), mode="area") if t.shape[-2:] != (size, size) else t
    return (out.reshape(*lead, size, size) > 0.5).numpy()


def scale_points(points: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Map (x, y) pixel coordinates between two frames of the same field of view (pixel-centre convention)."""
    p = np.asarray(points, dtype=np.float64)
    sx = to_hw[1] / from_hw[1]
    sy = to_hw[0] / from_hw[0]
    return np.stack([(p[:, 0] + 0.5) * sx - 0.5, (p[:, 1] + 0.5) * sy - 0.5], axis=1)
