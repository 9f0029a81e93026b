"""Property tests of holons.anatomy on tiny tensors (the whole file runs in seconds on CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from holons.anatomy import (
    PAPER_LOCAL_BANDS,
    CutMixConfig,
    IntensityConfig,
    ViewConfig,
    ViewGenerator,
    Views,
    augment_intensity,
    box_area,
    box_masks,
    cutmix,
    foreground_lambda,
    gaussian_blur,
    make_views,
    mix_targets,
    nested_area_bands,
    nested_local_boxes,
    part_boxes,
    part_local_boxes,
    resample,
    sample_partner,
    whole_boxes,
)
from holons.config import load_config
from holons.errors import ConfigError, HolonsError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NO_INTENSITY = IntensityConfig(window_prob=0.0, gamma_prob=0.0, blur_prob_global=0.0, blur_prob_local=0.0,
                               blur_prob_whole=0.0, noise_prob=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_cfg(**kw) -> ViewConfig:
    base = dict(global_size=32, local_size=16, k=2)
    base.update(kw)
    return ViewConfig(**base)


def plain_cfg(**kw) -> ViewConfig:
    """Geometry only: no intensity augmentation, no rotation."""
    return tiny_cfg(intensity=NO_INTENSITY, rotation_degrees=0.0, warmup_rotation_degrees=0.0, **kw)


# ---------------------------------------------------------------- decomposer


@pytest.mark.parametrize("level,k,whole_size", [(1, 2, 32), (0, 4, 64), (2, 2, 16)])
def test_parts_tile_the_whole_exactly(level, k, whole_size):
    images = torch.rand(3, 1, 64, 64, generator=gen(1))
    whole = whole_boxes(3, (64, 64), level, gen(2), margin=0.05)
    parts = part_boxes(whole, k)
    # Boxes: raster order, shared edges, outer edges are the whole's, areas add up.
    assert torch.equal(parts[:, 0, :2], whole[:, :2]) and torch.equal(parts[:, -1, 2:], whole[:, 2:])
    for i in range(k * k):
        row, col = divmod(i, k)
        if col + 1 < k:
            assert torch.equal(parts[:, i, 2], parts[:, i + 1, 0])
            assert torch.equal(parts[:, i, 1], parts[:, i + 1, 1])
        if row + 1 < k:
            assert torch.equal(parts[:, i, 3], parts[:, i + k, 1])
            assert torch.equal(parts[:, i, 0], parts[:, i + k, 0])
    assert torch.allclose(box_area(parts).sum(1), box_area(whole))
    # Pixels: the parts at whole_size / k, put back in raster order, are exactly the whole's pixels.
    whole_view = resample(images, whole[:, None], whole_size)[:, 0]
    part_views = resample(images, parts, whole_size // k)
    s = whole_size // k
    rebuilt = torch.zeros_like(whole_view)
    for i in range(k * k):
        row, col = divmod(i, k)
        rebuilt[..., row * s:(row + 1) * s, col * s:(col + 1) * s] = part_views[:, i]
    assert torch.equal(rebuilt, whole_view)
    for b in range(3):  # and, at the whole's own resolution, the image's pixels
        x0, y0, x1, y1 = whole[b].long().tolist()
        assert torch.equal(whole_view[b], images[b, :, y0:y1, x0:x1])


def test_generator_whole_and_parts_are_exact_resamplings():
    images = torch.rand(2, 1, 64, 64, generator=gen(3))
    cfg = tiny_cfg(intensity=NO_INTENSITY)  # crops rotate; the whole and the parts do not
    views = make_views(images, 1, cfg, gen(4))
    for b in range(2):
        x0, y0, x1, y1 = views.whole_box[b].long().tolist()
        assert (x1 - x0, y1 - y0) == (32, 32)
        assert torch.equal(views.whole[b], images[b, :, y0:y1, x0:x1])
    assert torch.equal(views.parts, resample(images, views.part_boxes, 32))
    assert (views.local_angles != 0).all() and (views.global_angles != 0).all()


def test_part_order_is_raster():
    whole = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    parts = part_boxes(whole, 2)[0].tolist()
    assert parts == [[0, 0, 1, 1], [1, 0, 2, 1], [0, 1, 1, 2], [1, 1, 2, 2]]  # TL, TR, BL, BR


@pytest.mark.parametrize("hw", [(64, 64), (96, 128)])
def test_whole_side_halves_per_level(hw):
    h, w = hw
    for level in range(4):
        boxes = whole_boxes(16, hw, level, gen(level), margin=0.05)
        assert torch.allclose(boxes[:, 2] - boxes[:, 0], torch.full((16,), w / 2**level))
        assert torch.allclose(boxes[:, 3] - boxes[:, 1], torch.full((16,), h / 2**level))
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        if level >= 1:  # room for the margin: kept away from the border (up to the integer rounding)
            m = 0.05 * min(h, w) - 0.5
            assert (boxes[:, :2] >= m).all() and (boxes[:, 2] <= w - m).all() and (boxes[:, 3] <= h - m).all()
    with pytest.raises(HolonsError):
        whole_boxes(1, (8, 8), 4, gen())


# ---------------------------------------------------------------- crops


def test_nested_crops_nest_in_w_with_sorted_bands():
    assert torch.allclose(torch.tensor(nested_area_bands(8)), torch.tensor(PAPER_LOCAL_BANDS))
    whole = whole_boxes(32, (64, 64), 1, gen(3))
    boxes = nested_local_boxes(whole, 8, gen(4))
    eps = 1e-4
    assert (boxes[..., :2] >= whole[:, None, :2] - eps).all()
    assert (boxes[..., 2:] <= whole[:, None, 2:] + eps).all()
    frac = box_area(boxes) / box_area(whole)[:, None]
    for i, (lo, hi) in enumerate(PAPER_LOCAL_BANDS):
        assert (frac[:, i] >= lo - eps).all() and (frac[:, i] <= hi + eps).all()
    assert (frac[:, 1:].min(0).values >= frac[:, :-1].max(0).values - eps).all()  # sorted bands
    aspect = (boxes[..., 2] - boxes[..., 0]) / (boxes[..., 3] - boxes[..., 1])
    assert (aspect[:, 0::2] <= 1 + eps).all() and (aspect[:, 0::2] >= 2 / 3 - eps).all()  # tall
    assert (aspect[:, 1::2] >= 1 - eps).all() and (aspect[:, 1::2] <= 1.5 + eps).all()  # wide


def test_part_local_crops_lie_inside_their_part():
    whole = whole_boxes(8, (64, 64), 1, gen(5))
    parts = part_boxes(whole, 2)
    boxes, index = part_local_boxes(parts, 3, gen(6))
    assert index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    own = parts[:, index]
    eps = 1e-4
    assert (boxes[..., :2] >= own[..., :2] - eps).all() and (boxes[..., 2:] <= own[..., 2:] + eps).all()


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize(
    "hw,alpha,grid_k", [((13, 21), 1.0, None), ((16, 16), 0.4, None), ((12, 12), 1.0, 3)]
)
def test_pasted_fraction_is_one_minus_lambda(hw, alpha, grid_k):
    n = 64
    values = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)  # a distinct constant per image
    images = values[:, None, None, None].expand(n, 1, *hw).clone()
    res = cutmix(images, gen(7), prob=1.0, alpha=alpha, grid_k=grid_k)
    pasted = (res.images == values[res.partner][:, None, None, None]).flatten(1).sum(1)
    assert torch.equal(pasted, torch.round((1 - res.lam) * hw[0] * hw[1]).long())
    assert torch.allclose(pasted.float() / (hw[0] * hw[1]), 1 - res.lam, atol=1e-6)
    assert (res.partner != torch.arange(n)).all()  # nobody mixes with itself
    assert 0 < (1 - res.lam).mean() < 0.6
    if grid_k:  # snapped boxes sit on the grid lines
        cell = hw[1] // grid_k
        assert (res.boxes % cell == 0).all()


def test_mixing_probability_zero_is_identity():
    images = torch.rand(4, 1, 9, 9, generator=gen())
    res = cutmix(images, gen(1), prob=0.0)
    assert torch.equal(res.images, images) and (res.lam == 1).all()
    cfg = plain_cfg(cutmix=CutMixConfig(prob=0.0))
    a = make_views(images.repeat(1, 1, 4, 4), 0, cfg, gen(2))
    assert a.partner is None and a.local_lambda is None


def test_mixed_targets_are_convex_combinations():
    targets = torch.softmax(torch.randn(6, 10, generator=gen()), dim=-1)
    lam = torch.rand(6, 5, generator=gen(1))
    partner = sample_partner(6, gen(2), "cpu")
    mixed = mix_targets(targets, lam, partner)
    assert mixed.shape == (6, 5, 10)
    assert torch.allclose(mixed.sum(-1), torch.ones(6, 5))
    lo = torch.minimum(targets, targets[partner])[:, None]
    hi = torch.maximum(targets, targets[partner])[:, None]
    assert (mixed >= lo - 1e-7).all() and (mixed <= hi + 1e-7).all()
    assert torch.allclose(mix_targets(targets, torch.ones(6), partner), targets)


def test_foreground_lambda_counts_foreground_pixels():
    a = torch.ones(1, 1, 10, 10)  # bright background, dark chromosomes
    b = torch.ones(1, 1, 10, 10)
    a[..., 0:2, 0:10] = 0.1  # 20 foreground pixels, 10 of them under the box
    b[..., 5:10, 0:6] = 0.1  # 30 foreground pixels, 6 of them under the box
    mask = box_masks(torch.tensor([[0.0, 1.0, 10.0, 2.0]]), (10, 10)) | box_masks(
        torch.tensor([[0.0, 5.0, 6.0, 6.0]]), (10, 10))
    lam = foreground_lambda(a, b, mask, threshold=0.5, foreground="below")
    assert lam.tolist() == pytest.approx([10 / 16])
    empty = foreground_lambda(torch.ones_like(a), torch.ones_like(b), mask, foreground="below")
    assert empty.tolist() == pytest.approx([1 - 16 / 100])


def test_view_cutmix_pastes_partner_pixels_with_exact_lambda():
    b = 6
    values = torch.linspace(0.2, 0.8, b)
    images = values[:, None, None, None].expand(b, 1, 64, 64).clone()
    cfg = plain_cfg(cutmix=CutMixConfig(prob=1.0), local_crops="both")
    views = make_views(images, 1, cfg, gen(8))
    assert views.partner is not None and (views.local_lambda < 1).any()
    for crops, lam in ((views.global_crops, views.global_lambda), (views.local_crops, views.local_lambda)):
        theirs = values[views.partner][:, None, None, None, None]
        pasted = torch.isclose(crops, theirs.expand_as(crops), atol=1e-6).flatten(2).float().mean(2)
        assert torch.allclose(pasted, 1 - lam, atol=1e-6)
    # The teacher's views are not mixed.
    assert torch.allclose(views.whole, values[:, None, None, None].expand_as(views.whole))


def test_part_swap_mode_swaps_whole_parts_consistently():
    images = torch.rand(4, 1, 64, 64, generator=gen(9))
    cfg = plain_cfg(cutmix=CutMixConfig(prob=1.0, mode="parts"))
    views = make_views(images, 1, cfg, gen(10))
    ref = make_views(images, 1, plain_cfg(), gen(10))
    swap, partner = views.part_swap, views.partner
    assert swap.any(1).all() and (~swap).any(1).all()  # a non-empty, proper subset per sample
    for b in range(4):
        for j in range(4):
            source = partner[b] if swap[b, j] else b
            assert torch.allclose(views.parts[b, j], ref.parts[source, j], atol=1e-5)
            r, c = divmod(j, 2)
            rows, cols = slice(r * 16, (r + 1) * 16), slice(c * 16, (c + 1) * 16)
            assert torch.allclose(views.whole[b, :, rows, cols], ref.whole[source, :, rows, cols], atol=1e-5)


# ---------------------------------------------------------------- augmentation and the generator


def test_flip_is_off_by_default_and_mirrors_when_on():
    assert ViewConfig().hflip is False
    images = torch.rand(2, 1, 48, 48, generator=gen())
    views = make_views(images, 0, plain_cfg(), gen(3))
    assert torch.allclose(views.global_crops, resample(images, views.global_boxes, 32), atol=1e-6)
    flipped = make_views(images, 0, plain_cfg(hflip=True, hflip_prob=1.0), gen(3))
    mirrored = resample(images, flipped.global_boxes, 32).flip(-1)
    assert torch.allclose(flipped.global_crops, mirrored, atol=1e-6)
    assert torch.allclose(flipped.whole, views.whole)  # the whole is never flipped


def test_intensity_augmentation_stays_in_range_and_blur_keeps_constants():
    views = torch.rand(3, 4, 1, 16, 16, generator=gen())
    out = augment_intensity(views, IntensityConfig(noise_prob=1.0), 1.0, gen(1))
    assert out.shape == views.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, views)
    flat = torch.full((2, 1, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat, atol=1e-6)
    assert torch.equal(augment_intensity(views, NO_INTENSITY, 0.0, gen(1)), views)


def test_same_seed_same_views_and_new_seed_new_views():
    images = torch.rand(3, 1, 64, 64, generator=gen())
    cfg = tiny_cfg(local_crops="both", cutmix=CutMixConfig(prob=0.5, alpha=0.7),
                   intensity=IntensityConfig(noise_prob=0.5))
    a, b = make_views(images, 1, cfg, gen(11)), make_views(images, 1, cfg, gen(11))
    c = make_views(images, 1, cfg, gen(12))
    for f in dataclasses.fields(Views):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f.name
    assert not torch.equal(a.local_crops, c.local_crops)


@pytest.mark.parametrize("device", DEVICES)
def test_views_contract_and_device(device):
    images = torch.rand(2, 1, 64, 64, generator=gen()).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    cfg = tiny_cfg(local_crops="both", n_part_local=2, cutmix=CutMixConfig(prob=1.0))
    v = ViewGenerator(cfg)(images, level=1, generator=g)
    assert (v.mode, v.level, v.k, v.batch_size, v.n_parts) == ("part_whole", 1, 2, 2, 4)
    assert v.whole.shape == (2, 1, 32, 32) and v.whole_box.shape == (2, 4)
    assert v.global_crops.shape == (2, 1, 1, 32, 32) and v.global_boxes.shape == (2, 1, 4)
    assert v.local_crops.shape == (2, 16, 1, 16, 16) and v.local_boxes.shape == (2, 16, 4)
    assert v.local_part_index.tolist() == [-1] * 8 + [0, 0, 1, 1, 2, 2, 3, 3]
    assert v.parts.shape == (2, 4, 1, 32, 32) and v.part_boxes.shape == (2, 4, 4)
    assert v.global_lambda.shape == (2, 1) and v.local_lambda.shape == (2, 16) and v.partner.shape == (2,)
    for f in dataclasses.fields(Views):
        x = getattr(v, f.name)
        if isinstance(x, torch.Tensor):
            assert x.device.type == torch.device(device).type, f.name
    warm = ViewGenerator(cfg)(images, level=0, generator=g, mode="localizability")
    assert warm.parts is None and warm.global_crops.shape == (2, 2, 1, 32, 32)
    assert warm.local_crops.shape == (2, 8, 1, 16, 16) and (warm.local_part_index == -1).all()
    assert warm.global_lambda.eq(1).all()  # the teacher's global crops are never box-mixed
    assert warm.local_angles.abs().max() <= 30 and v.local_angles.abs().max() <= 10


def test_config_loads_from_yaml_and_rejects_bad_values(tmp_path):
    path = tmp_path / "views.yaml"
    path.write_text("global_size: 64\nlocal_size: 32\nlocal_crops: both\ncutmix:\n  prob: 0.5\n"
                    "intensity:\n  blur_prob_local: 0.25\n")
    cfg = load_config(ViewConfig, path, ["cutmix.alpha=0.5", "global_scale=[0.5, 1.0]"])
    assert (cfg.global_size, cfg.local_crops, cfg.cutmix.prob, cfg.cutmix.alpha) == (64, "both", 0.5, 0.5)
    assert cfg.intensity.blur_prob_local == 0.25 and cfg.global_scale == (0.5, 1.0) and cfg.hflip is False
    defaults = ViewConfig()
    assert (defaults.intensity.blur_prob_global, defaults.intensity.blur_prob_local,
            defaults.intensity.blur_prob_whole) == (1.0, 0.5, 0.1)
    assert (defaults.rotation_degrees, defaults.warmup_rotation_degrees, defaults.n_local) == (10.0, 30.0, 8)
    with pytest.raises(ConfigError):
        load_config(ViewConfig, None, ["cutmix.unknown=1"])
    with pytest.raises(ConfigError):
        load_config(ViewConfig, None, ["local_crops=random"])
    with pytest.raises(ConfigError):
        load_config(ViewConfig, None, ["intensity.blur_prob_local=2.0"])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(HolonsError, match=r"\(B, C, H, W\)"):
        make_views(torch.rand(64, 64), 0, tiny_cfg())
    with pytest.raises(HolonsError, match="floating-point"):
        make_views(torch.zeros(1, 1, 64, 64, dtype=torch.uint8), 0, tiny_cfg())
    with pytest.raises(HolonsError, match="level"):
        make_views(torch.rand(1, 1, 16, 16), 4, tiny_cfg())
