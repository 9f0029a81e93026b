"""Part-based local branches of the karyotype model (sgma_parts, pdisconet_parts): the part module
learns from the L-Net's loss, its priors enter while the L-Net trains, and a short run trains,
saves and predicts like the zoom."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from holons.config import load_config
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.errors import ConfigError
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.losses import phase_loss
from holons.finetune.karyotype.model import VarifocalNet
from holons.finetune.karyotype.schedule import schedule

TINY = "configs/finetune/karyotype_cpu_tiny.yaml"
PART_MODULE = {"sgma_parts": "part_attention", "pdisconet_parts": "l_parts"}


def _chromosomes(n: int = 4, size: int = 64) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    x[:, :, 12:52, 26:38] = torch.rand(n, 1, 40, 12)
    return x


@pytest.mark.parametrize("variant", sorted(PART_MODULE))
def test_part_module_learns_from_the_lnet_loss(variant):
    torch.manual_seed(0)
    over = [f"model.variant={variant}", "data.input_size=64", "model.parts=3"]
    cfg = load_config(KaryotypeConfig, TINY, over)
    model = VarifocalNet(cfg.model, 64)
    lnet = next(p for p in schedule(cfg) if p.name == "lnet_1")
    assert PART_MODULE[variant] in lnet.trains
    out = model(_chromosomes(), ("l",))
    assert out["part_maps"].shape[:2] == (4, 3 + (variant == "pdisconet_parts"))
    assert torch.isfinite(out["part_loss"]) and out["part_loss"] > 0
    loss = phase_loss(model, lnet, _chromosomes(), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 1, -1]),
                      cfg, None)
    loss.backward()
    module = getattr(model, PART_MODULE[variant])
    assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0
    # the G-Net head alone needs no part branch; a part branch not in training computes no priors
    assert "part_maps" not in model(_chromosomes(), ("g",))
    module.eval()
    assert "part_loss" not in model(_chromosomes(), ("l",))


def test_part_options_are_checked():
    with pytest.raises(ConfigError, match="model.parts"):
        load_config(KaryotypeConfig, TINY, ["model.variant=sgma_parts", "model.parts=0"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(PART_MODULE))
def test_part_variant_trains_saves_and_predicts_the_test_split(variant, tmp_path):
    """A short run of every step; the saved model predicts its own test split as the run evaluated it."""
    torch.set_num_threads(1)
    from holons.finetune.karyotype import api as karyotype_api

    data = generate_karyotypes(tmp_path / "syn", cases=10, seed=0, abnormal_rate=0.0, flip_rate=0.5,
                               workers=1)
    over = [f"model.variant={variant}", "data.input_size=64", "train.gnet_epochs=1", "train.lnet_epochs=1",
            "train.fusion_epochs=1", "train.epoch_steps=2", "data.test_fraction=0.3"]
    run = karyotype_api.train(TINY, data=data, out=tmp_path / "run", overrides=over)
    assert run.metrics["head"] == "fusion" and run.metrics["test_chromosomes"] > 0
    phases = [json.loads(line)["phase"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert phases == ["gnet", "lnet_1", "fusion"]
    split = pd.read_csv(run.out / "split.csv", dtype={"case_id": str})
    rows = pd.read_csv(data, dtype={"case_id": str, "slide_id": str})
    test_rows = rows.set_index("path").loc[split.loc[split["split"] == "test", "path"]].reset_index()
    test_rows.to_csv(tmp_path / "syn" / "test_manifest.csv", index=False)
    karyotype_api.predict(run.model, data=tmp_path / "syn" / "test_manifest.csv", out=tmp_path / "pred",
                          device="cpu")
    own = pd.read_csv(run.out / "eval" / "predictions.csv").merge(
        pd.read_csv(tmp_path / "pred" / "predictions.csv"), on="path")
    assert len(own) == run.metrics["test_chromosomes"]
    assert (own["pred_label"] + 1 == own["pred_class_1to24"]).all()
