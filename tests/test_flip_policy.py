"""Flip policy: radiograph view generators do not mirror by default (radiographs have laterality);
when asked to, they do. Chromosome augmentation and test-time flips keep their own documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from holons.anatomy.intensity import IntensityConfig
from holons.anatomy.views import ViewConfig, ViewGenerator
from holons.config import load_config
from holons.finetune.karyotype.config import KaryotypeTrainConfig
from holons.ssl.config import PretrainConfig

PRETRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml"))
NO_INTENSITY = IntensityConfig(window_prob=0.0, gamma_prob=0.0, blur_prob_global=0.0, blur_prob_local=0.0,
                               blur_prob_whole=0.0, noise_prob=0.0)


def test_radiograph_views_do_not_flip_by_default():
    assert ViewConfig().hflip is False
    assert PretrainConfig().views.hflip is False


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_pretrain_configs_keep_flips_off(path):
    assert load_config(PretrainConfig, path).views.hflip is False


def _left_right_order(hflip: bool) -> torch.Tensor:
    """Per student crop of a horizontal ramp (dark left, bright right): True where the crop's left
    column is darker than its right column, i.e. the crop is not mirrored."""
    ramp = torch.linspace(0, 1, 64).expand(2, 1, 64, 64).contiguous()
    cfg = ViewConfig(global_size=32, local_size=16, k=2, intensity=NO_INTENSITY, rotation_degrees=0.0,
                     warmup_rotation_degrees=0.0, hflip=hflip, hflip_prob=1.0)
    v = ViewGenerator(cfg)(ramp, level=1, generator=torch.Generator().manual_seed(0))
    crops = [v.global_crops.flatten(0, 1), v.local_crops.flatten(0, 1)]
    return torch.cat([c[..., 0].mean(dim=(-2, -1)) < c[..., -1].mean(dim=(-2, -1)) for c in crops])


def test_views_keep_left_and_right_unless_hflip_is_on():
    assert _left_right_order(hflip=False).all()
    assert not _left_right_order(hflip=True).any()  # hflip_prob 1: every student crop mirrored


def test_karyotype_flip_defaults_are_documented_choices():
    # chromosomes have no laterality: training mirrors them; test-time mirroring stays opt-in (measured)
    cfg = KaryotypeTrainConfig()
    assert cfg.hflip is True and cfg.test_time_hflip is False
