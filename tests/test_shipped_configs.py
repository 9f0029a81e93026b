"""Every file under configs/ loads through its typed config class and passes its checks; the
karyotype configs with small backbones also build their model (a config that names a missing
backbone or an impossible input size fails here, not an hour into a run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from holons.config import load_config
from holons.finetune.config import ClassifyConfig, SegmentConfig
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.ssl.config import PretrainConfig, validate
from holons.ssl.methods import plan_segments

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# studies/ are study specs, loaded and expanded by tests/test_study_specs.py
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*")
                 if p.is_file() and p.relative_to(CONFIGS).parts[0] != "studies")
# Backbones too slow to build in a unit test; their configs are still loaded and validated.
SLOW_TO_BUILD = {"resnet50"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _config_class(name: str) -> type:
    folder = name.split("/")[0]
    if folder == "pretrain" and name.endswith(".yaml"):
        return PretrainConfig
    if folder == "finetune" and Path(name).name.startswith("karyotype") and name.endswith(".yaml"):
        return KaryotypeConfig
    radiograph = {"classify": ClassifyConfig, "segment": SegmentConfig}
    if folder == "finetune" and Path(name).stem.split("_")[0] in radiograph and name.endswith(".yaml"):
        return radiograph[Path(name).stem.split("_")[0]]
    raise AssertionError(f"configs/{name}: no typed config class known for it; add it to this test")


def test_configs_folder_is_not_empty():
    assert any(n.startswith("pretrain/") for n in SHIPPED) and any(n.startswith("finetune/") for n in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_loads_and_validates(name):
    cls = _config_class(name)
    cfg = load_config(cls, CONFIGS / name)  # unknown keys and wrong types raise ConfigError
    assert isinstance(cfg, cls)
    if cls is PretrainConfig:
        validate(cfg)
        segments = plan_segments(cfg, steps_per_epoch=10)
        assert segments and all(s.steps > 0 for s in segments)
    elif cls is KaryotypeConfig:
        assert cfg.model.g_backbone and cfg.data.input_size >= 16  # __post_init__ checked the rest


KARYOTYPE = [n for n in SHIPPED if _config_class(n) is KaryotypeConfig]


@pytest.mark.parametrize("name", KARYOTYPE)
def test_karyotype_config_builds_its_model(name):
    from holons.finetune.karyotype.model import VarifocalNet

    cfg = load_config(KaryotypeConfig, CONFIGS / name)
    slow = {cfg.model.g_backbone, cfg.model.l_backbone} & SLOW_TO_BUILD
    if slow:
        pytest.skip(f"{name}: {', '.join(sorted(slow))} is slow to build; the config was validated above")
    torch.manual_seed(0)
    model = VarifocalNet(cfg.model, cfg.data.input_size)
    assert sum(p.numel() for p in model.parameters()) > 0
