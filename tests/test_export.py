"""Export round-trip: the exported folder loads through timm's ``local-dir:`` source unchanged."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from pretrain_fixtures import tiny_config, write_phantoms

from holons.cli import main
from holons.errors import HolonsError
from holons.ssl.export import export, foundation_preprocessing, foundation_stats, load_foundation
from holons.ssl.trainer import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    stages = [{"mode": "part_whole", "levels": [0], "steps_per_level": 2}]
    cfg = tiny_config(write_phantoms(tmp / "phantoms", n=16), stages, data={"mean": 0.4, "std": 0.2})
    result = pretrain(cfg, tmp / "run")
    return tmp / "run", result


def test_timm_local_dir_gives_identical_outputs(run, tmp_path):
    run_dir, result = run
    out = export(run_dir, tmp_path / "teacher")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_classes == 0
    assert model.stem[0].weight.shape[1] == 1  # in_chans = 1
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (1, 64, 64)
    assert list(cfg["mean"]) == [0.4] and list(cfg["std"]) == [0.2]
    x = torch.randn(3, 1, 64, 64)
    teacher = result.teacher.backbone.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))
    # the teacher is the default, and it differs from the student after training
    student_dir = export(run_dir, tmp_path / "student", which="student")
    student = timm.create_model(f"local-dir:{student_dir}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(student(x), result.student.encoder.backbone.model.eval()(x))
        assert not torch.equal(student(x), model(x))
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "convnext_atto" and meta["holons"]["which"] == "teacher"
    assert meta["holons"]["step"] == 2


def test_load_foundation_and_a_new_head(run, tmp_path):
    run_dir, result = run
    out = export(run_dir, tmp_path / "f")
    backbone = load_foundation(out).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), result.teacher.backbone.model.eval()(x))
        assert backbone.forward_dense(x).ndim == 4
    assert foundation_stats(out)["mean"] == (0.4,)
    prep = foundation_preprocessing(out)  # the radiograph preprocessing contract travels with the weights
    assert (prep.size, prep.resize) == (foundation_stats(out)["input_size"][-1], "letterbox")
    # fine-tuning style: a classifier on top, 3 input channels adapted from the 1-channel stem
    clf = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5, in_chans=3)
    assert clf(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_export_cli_and_errors(run, tmp_path):
    run_dir, _ = run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "cli"), "--which", "student"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["holons"]["which"] == "student"
    with pytest.raises(HolonsError, match="no usable checkpoint"):
        export(tmp_path / "nothing-here", tmp_path / "x")
    with pytest.raises(HolonsError, match="not an exported foundation folder"):
        load_foundation(tmp_path)


def test_karyotype_net_normalizes_inputs_as_the_foundation_was_trained(run, tmp_path):
    from holons.finetune.karyotype.config import KaryotypeModelConfig
    from holons.finetune.karyotype.model import VarifocalNet

    run_dir, result = run
    out = export(run_dir, tmp_path / "f")
    cfg = KaryotypeModelConfig(variant="l_whole", g_backbone="convnext_atto", l_backbone="convnext_atto",
                               g_pretrained_dir=str(out), l_pretrained_dir=str(out))
    net = VarifocalNet(cfg, 64).eval()
    x = torch.rand(2, 1, 64, 64)
    teacher = result.teacher.backbone.model.eval()
    with torch.no_grad():
        got = net(x, ("g", "l"))
        assert torch.allclose(got["g_feat"], teacher((x - 0.4) / 0.2), atol=1e-5)
        small = torch.nn.functional.interpolate(x, size=(32, 32), mode="area")
        assert torch.allclose(got["l_feat"], teacher((small - 0.4) / 0.2), atol=1e-5)
    # random init sees the [0, 1] images unchanged
    plain = VarifocalNet(KaryotypeModelConfig(variant="g_only", g_backbone="convnext_atto"), 64).eval()
    with torch.no_grad():
        assert torch.equal(plain(x, ("g",))["g_feat"], plain.g_backbone(x))
