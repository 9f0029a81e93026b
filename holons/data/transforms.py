"""MONAI transforms around ``read_image``, so MONAI users can ``Compose`` holons' reader.

``LoadRadiograph`` maps a path to a channel-first float32 array: 1 x H x W (1 x F x H x W with
``frame="all"``: frames as a depth axis). ``LoadRadiographd`` does the same for dictionary keys
and stores each image's meta under ``f"{key}_meta"``.
Flip policy: these transforms only read; they never mirror an image (radiographs have laterality,
see ``holons.anatomy.views.ViewConfig.hflip``). In transform output, missing meta values
are NaN (not None) and a missing pixel spacing is (NaN, NaN), so batches collate in a DataLoader.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from holons.data.readers import read_image, validate_read_options

_NAN = float("nan")


def collatable_meta(meta: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """``meta`` with None -> NaN (spacing -> (NaN, NaN)) and MONAI's ``filename_or_obj`` added."""
    out = {key: (_NAN if value is None else value) for key, value in meta.items()}
    if meta.get("pixel_spacing_mm") is None:
        out["pixel_spacing_mm"] = (_NAN, _NAN)
    out["filename_or_obj"] = str(path)
    return out


class LoadRadiograph(Transform):
    """Path -> channel-first float32 image in [0, 1], bright = dense (see ``holons.data.read_image``).

    Args:
        image_only: return only the image; else ``(image, meta)``.
        as_tensor: a ``torch.Tensor`` (default) or a NumPy array.
        reader_options: ``voi``, ``frame``, ``nifti_slice``, ``nifti_axis``, ``nifti_projection``,
            ``format`` as for ``read_image``.
    """

    def __init__(self, image_only: bool = True, as_tensor: bool = True, **reader_options: Any):
        unknown = set(reader_options) - set(read_image.__kwdefaults__)
        if unknown:
            raise TypeError(f"unknown reader options: {sorted(unknown)}")
        validate_read_options(**{**read_image.__kwdefaults__, **reader_options})
        self.image_only = image_only
        self.as_tensor = as_tensor
        self.reader_options = reader_options

    def __call__(self, path: str | Path):
        image = read_image(path, **self.reader_options)
        array = image.pixels[None]
        pixels = torch.from_numpy(np.ascontiguousarray(array)) if self.as_tensor else array
        if self.image_only:
            return pixels
        return pixels, collatable_meta(image.meta, path)


class LoadRadiographd(MapTransform):
    """Dictionary version of ``LoadRadiograph``: each key's path becomes its image, meta in ``f"{key}_meta"``.

    Args:
        keys: keys holding paths.
        meta_key_postfix: suffix of the meta keys (``"meta"`` -> ``"image_meta"``).
        image_only: do not store meta.
        allow_missing_keys: skip keys absent from the dictionary.
        as_tensor, reader_options: as for ``LoadRadiograph``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        meta_key_postfix: str = "meta",
        image_only: bool = False,
        allow_missing_keys: bool = False,
        as_tensor: bool = True,
        **reader_options: Any,
    ):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadRadiograph(image_only=False, as_tensor=as_tensor, **reader_options)
        self.meta_key_postfix = meta_key_postfix
        self.image_only = image_only

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image, meta = self.loader(d[key])
            d[key] = image
            if not self.image_only:
                d[f"{key}_{self.meta_key_postfix}"] = meta
        return d
