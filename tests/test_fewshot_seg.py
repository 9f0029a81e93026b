"""Few-shot segmentation decoder and loss: thin structures are learnable in a few dozen steps, a thin
structure weighs at least as much as a large one in the loss, and per-group decoders put each channel
where it belongs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from holons.data.annotated import STRUCTURES
from holons.errors import HolonsError
from holons.eval.features import load_backbone
from holons.finetune.heads import STRUCTURE_GROUPS, Segmenter, structure_groups
from holons.finetune.metrics import dice
from holons.finetune.segmenter import SegmentationLoss, predict_masks, train_segmenter

torch.set_num_threads(1)


def _discs_and_bars(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with a bright disc (channel 0) and a 2-px-wide bright bar (channel 1) of the same
    intensity, so the bar must be told apart by its shape, at random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = 0.3 + rng.normal(0, 0.05, (n, 1, size, size))
    masks = np.zeros((n, 2, size, size), dtype=np.float32)
    for i in range(n):
        cy, cx, r = rng.integers(36, 50), rng.integers(16, 48), rng.integers(9, 13)
        masks[i, 0] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        row, col, length = rng.integers(6, 22), rng.integers(4, 20), rng.integers(28, 40)
        masks[i, 1, row:row + 2, col:col + length] = 1
    images += 0.4 * masks.max(axis=1, keepdims=True)
    x = (torch.from_numpy(images.astype(np.float32)) - 0.5) / 0.25
    return x, torch.from_numpy(masks)


def test_decoder_learns_a_thin_bar_in_a_few_dozen_steps():
    """ConvNeXt's pyramid starts at stride 4, twice the bar's width: the full-resolution image skips
    and the Dice loss must still find the bar on new images."""
    torch.manual_seed(0)
    backbone = load_backbone("random", "convnext_atto")
    x, y = _discs_and_bars(6, seed=0)
    model = train_segmenter(backbone, x, y, steps=40, batch_size=6, groups=[[0], [1]], augment=False, seed=0)
    x_new, y_new = _discs_and_bars(4, seed=1)
    pred = predict_masks(model, x_new)
    bar = np.mean([dice(pred[i, 1], y_new[i, 1].numpy() > 0) for i in range(4)])
    disc = np.mean([dice(pred[i, 0], y_new[i, 0].numpy() > 0) for i in range(4)])
    assert bar > 0.5, bar
    assert disc > 0.8, disc


def test_loss_gives_a_thin_structure_at_least_the_weight_of_a_large_one():
    target = torch.zeros(1, 2, 32, 32)
    target[0, 0, 4:28, 4:28] = 1  # 576 px
    target[0, 1, 10:12, 4:28] = 1  # 48 px: a thin bar
    missed_small = target.clone() * 20 - 10  # logits: right everywhere ...
    missed_small[0, 1] = -10  # ... except the bar, missed entirely
    missed_large = target.clone() * 20 - 10
    missed_large[0, 0] = -10

    def losses(loss: SegmentationLoss) -> tuple[float, float, float]:
        return (float(loss(target * 20 - 10, target)), float(loss(missed_small, target)),
                float(loss(missed_large, target)))

    perfect, small, large = losses(SegmentationLoss(bce_weight=0.0))  # soft Dice alone
    assert perfect < 0.01 and small > 0.4 and small == pytest.approx(large, rel=0.05)
    perfect, small, large = losses(SegmentationLoss())  # + class-balanced BCE
    assert perfect < 0.01 and small >= large
    _, small_plain, large_plain = losses(SegmentationLoss(balance_bce=False))
    assert small_plain < large_plain  # a pixel-mean BCE cares less about missing the bar
    with pytest.raises(HolonsError):
        SegmentationLoss(bce_weight=-1)


def test_structure_groups_and_decoder_routing():
    groups = structure_groups(STRUCTURES)
    assert sorted(k for g in groups for k in g) == list(range(len(STRUCTURES)))
    named = [{STRUCTURES[k] for k in g} for g in groups]
    assert set(STRUCTURE_GROUPS["lungs"]) in named and set(STRUCTURE_GROUPS["clavicles"]) in named
    assert {"heart"} in named

    backbone = load_backbone("random", "resnet10t")
    model = Segmenter(backbone, 3, frozen=True, groups=[[2], [0, 1]]).eval()
    # make every decoder output constants that name its group and position: channel k must get k
    with torch.no_grad():
        for decoder, values in zip(model.decoders, ([2.0], [0.0, 1.0]), strict=True):
            decoder.head.weight.zero_()
            decoder.head.bias.copy_(torch.tensor(values))
        out = model(torch.zeros(1, 1, 32, 32))
    assert out.shape == (1, 3, 32, 32)
    assert [float(out[0, k].mean()) for k in range(3)] == [0.0, 1.0, 2.0]
    with pytest.raises(HolonsError, match="partition"):
        Segmenter(backbone, 3, frozen=True, groups=[[0], [1]])
