"""MONAI transforms LoadRadiograph / LoadRadiographd: shapes, options, Compose and DataLoader collation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Resized, ScaleIntensityd
from PIL import Image

from holons.data import LoadRadiograph, LoadRadiographd, UnreadableImage, read_image


@pytest.fixture
def pngs(tmp_path):
    paths = []
    for k in range(2):
        gray = (np.arange(12 * 16).reshape(12, 16) * (k + 1) % 256).astype(np.uint8)
        paths.append(tmp_path / f"img{k}.png")
        Image.fromarray(gray).save(paths[-1])
    return paths


def test_load_radiograph_array_version(pngs):
    image = LoadRadiograph()(pngs[0])
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape == (1, 12, 16)
    np.testing.assert_array_equal(image[0].numpy(), read_image(pngs[0]).pixels)
    array, meta = LoadRadiograph(image_only=False, as_tensor=False, voi="minmax")(str(pngs[1]))
    assert isinstance(array, np.ndarray) and array.shape == (1, 12, 16)
    assert array.min() == 0 and array.max() == 1
    assert meta["format"] == "png" and meta["filename_or_obj"] == str(pngs[1])
    assert all(math.isnan(s) for s in meta["pixel_spacing_mm"])  # unknown spacing collates as NaN


def test_load_radiograph_all_frames_is_channel_first_volume(tmp_path):
    pages = [Image.fromarray(np.full((5, 6), 40 * k, np.uint8)) for k in range(3)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    assert LoadRadiograph(frame="all")(tmp_path / "pages.tif").shape == (1, 3, 5, 6)


def test_load_radiograph_rejects_bad_options_early():
    with pytest.raises(TypeError):
        LoadRadiograph(window="lung")
    with pytest.raises(ValueError):
        LoadRadiograph(voi="auto")


def test_load_radiograph_raises_unreadable(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UnreadableImage):
        LoadRadiograph()(tmp_path / "x.txt")


def test_dictionary_version_composes_and_collates(pngs):
    transform = Compose(
        [
            LoadRadiographd(keys=["image"], voi="percentile"),
            Resized(keys=["image"], spatial_size=(8, 8)),
            ScaleIntensityd(keys=["image"]),
        ]
    )
    sample = transform({"image": str(pngs[0]), "label": 1})
    assert sample["image"].shape == (1, 8, 8) and sample["label"] == 1
    assert sample["image_meta"]["original_shape"] == (12, 16)
    assert "percentile" in sample["image_meta"]["voi_applied"]
    loader = DataLoader(
        Dataset([{"image": str(p), "label": k} for k, p in enumerate(pngs)], transform), batch_size=2
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 8, 8)
    assert list(batch["image_meta"]["format"]) == ["png", "png"]


def test_dictionary_version_options(pngs):
    d = LoadRadiographd(keys=["a", "b"], allow_missing_keys=True, image_only=True)({"a": pngs[0]})
    assert d["a"].shape == (1, 12, 16) and "a_meta" not in d and "b" not in d
    d = LoadRadiographd(keys="a", meta_key_postfix="info")({"a": pngs[0]})
    assert d["a_info"]["format"] == "png"
