"""The radiograph preprocessing contract: one function, recorded, and invertible to the source geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from holons.data.preprocess import Geometry, Preprocessing
from holons.errors import HolonsError


def _square_on(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.zeros(shape, dtype=np.float32)
    top, left, bottom, right = box
    image[top:bottom, left:right] = 1.0
    return image


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_a_bright_patch_lands_where_the_geometry_says(resize):
    source = _square_on((300, 120), (200, 40, 260, 100))  # tall image, patch low and to the right
    canvas, geometry = Preprocessing(size=64, resize=resize).apply(source)
    assert canvas.shape == (64, 64) and canvas.dtype == np.float32
    (x0, y0), (x1, y1) = geometry.from_source(np.array([[40.0, 200.0], [100.0, 260.0]]))
    inside = canvas[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
    assert inside.size > 0 and inside.min() > 0.9
    outside = canvas.copy()
    outside[int(y0) - 1:int(np.ceil(y1)) + 1, int(x0) - 1:int(np.ceil(x1)) + 1] = 0
    assert outside.max() < 0.05
    point = np.array([[7.5, 3.25]])
    np.testing.assert_allclose(geometry.to_source(geometry.from_source(point)), point)


def test_letterbox_keeps_the_aspect_ratio_and_stretch_does_not():
    letterbox = Preprocessing(size=64).geometry(300, 120)
    assert (letterbox.content_h, letterbox.content_w) == (64, 26)
    assert letterbox.pad_left == (64 - 26) // 2 and letterbox.pad_top == 0
    assert letterbox.scale_x == pytest.approx(letterbox.scale_y, rel=0.02)
    stretch = Preprocessing(size=64, resize="stretch").geometry(300, 120)
    assert (stretch.content_h, stretch.content_w, stretch.pad_left) == (64, 64, 0)


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_a_mask_goes_to_the_canvas_and_back_to_the_source_pixels(resize):
    mask = _square_on((180, 420), (30, 100, 150, 300)) > 0
    prep = Preprocessing(size=96, resize=resize)
    geometry = prep.geometry(*mask.shape)
    on_canvas = prep.mask(mask[None], geometry)
    assert on_canvas.shape == (1, 96, 96) and on_canvas.dtype == bool
    back = geometry.map_to_source(on_canvas.astype(np.float32))[0] > 0.5
    assert back.shape == mask.shape
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.97


def test_settings_round_trip_through_json_and_bad_ones_are_named():
    prep = Preprocessing(size=128, resize="stretch", voi="percentile", intensity="percentile")
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    with pytest.raises(HolonsError, match="resize"):
        Preprocessing(resize="crop")
    with pytest.raises(HolonsError, match="unknown preprocessing key.*sise"):
        Preprocessing.from_dict({"sise": 64})


def test_percentile_intensity_stretches_a_dim_image():
    dim = np.tile(np.linspace(0.1, 0.3, 70, dtype=np.float32), (50, 1))
    canvas, geometry = Preprocessing(size=32, intensity="percentile").apply(dim)
    content = canvas[geometry.pad_top:geometry.pad_top + geometry.content_h]
    assert content.max() > 0.9 and content.min() < 0.1 and dim.max() < 0.31


def test_geometry_reads_back_from_a_cache_index_row():
    geometry = Preprocessing(size=32).geometry(40, 80)
    row = {k: float(v) for k, v in geometry.as_dict().items()}
    assert Geometry.from_row(row) == geometry


def test_non_square_real_radiographs_and_their_lung_masks_map_back(shared_data):
    """covid_chestxray: mixed sizes; the lung mask placed on the canvas like the image, then mapped
    back, covers the same source pixels, and the image read through the contract is not distorted."""
    folder = shared_data / "radiographs" / "covid_chestxray"
    checked = 0
    for mask_path in sorted((folder / "annotations" / "lungVAE-masks").glob("*_mask.png")):
        stem = mask_path.name[: -len("_mask.png")]
        images = sorted((folder / "images").glob(stem + ".*"))
        if not images:
            continue
        mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        h, w = mask.shape
        if abs(h - w) < 0.1 * max(h, w) or not mask.any():
            continue
        prep = Preprocessing(size=128)
        canvas, geometry = prep.read(images[0])
        assert (geometry.orig_h, geometry.orig_w) == (h, w)
        assert abs(geometry.scale_x / geometry.scale_y - 1) < 0.05
        on_canvas = prep.mask(mask, geometry)
        back = geometry.map_to_source(on_canvas.astype(np.float32)) > 0.5
        dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
        assert dice > 0.9, (stem, dice)
        checked += 1
        if checked == 3:
            break
    assert checked == 3
