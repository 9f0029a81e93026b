"""Dataset distillation on tiny data: the distilled set is written and read back by the karyotype
reader, FYI's mirror enters the matching, DM's loss falls, resume continues exactly, CLI and API run."""

from __future__ import annotations

import copy
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from holons.cli import main
from holons.errors import ConfigError, HolonsError
from holons.finetune.distill import api
from holons.finetune.distill.config import DistillConfig, DistillExpertConfig, DistillMatchConfig
from holons.finetune.distill.convnet import ConvNet
from holons.finetune.distill.data import RealSet
from holons.finetune.distill.matching import (
    class_poses,
    dm_loss,
    gm_loss,
    matching_views,
    mirror_by_halves,
    posed,
)
from holons.finetune.distill.trajectory import as_parameters, flat_parameters, trajectory_loss
from holons.finetune.karyotype.data import KaryotypeDataset, read_crops, read_karyotype_manifest
from holons.finetune.karyotype.preprocess import Preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"data": {"size": 16, "test_fraction": 0.34, "val_fraction": 0.0}, "net": {"width": 8},
        "match": {"ipc": 2, "iterations": 4, "real_batch": 4, "checkpoint_every": 2},
        "evaluate": {"seeds": [0], "steps": 3, "batch_size": 32}, "device": "cpu"}


@pytest.fixture(scope="module")
def karyotypes(tmp_path_factory):
    from holons.data.synthetic.karyotypes import generate_karyotypes

    return generate_karyotypes(tmp_path_factory.mktemp("kt"), cases=3, seed=0, abnormal_rate=0.0, workers=1,
                               progress=False)


def test_distilled_chromosomes_are_read_back_by_the_karyotype_reader(karyotypes, tmp_path):
    result = api.distill(TINY, data=karyotypes, out=tmp_path / "run", progress=False)
    table, skipped = read_karyotype_manifest(result.manifest)
    assert not skipped and len(table) == 24 * 2
    assert sorted(table["label"].value_counts().to_dict().items()) == [(k, 2) for k in range(24)]
    assert set(table["polarity"]) == {-1}  # a learned image has no known polarity
    crops = read_crops(table, "gband")
    assert len(crops.crops) == 48 and not crops.skipped
    ds = KaryotypeDataset(crops, preprocessing=Preprocessing(stain="gband", canvas=16), size=16)
    assert ds.images.shape == (48, 1, 16, 16)
    summary = json.loads((tmp_path / "run" / api.SUMMARY_FILE).read_text())
    assert summary["kind"] == "karyotype" and summary["ipc"] == 2 and len(summary["classes"]) == 24
    assert set(summary["evaluation"]["arms"]) == {"distilled", "random"}
    assert 24 <= summary["evaluation"]["arms"]["random"]["train_images"] <= 48  # a rare type may have one
    assert (tmp_path / "run" / "config.yaml").is_file()
    with pytest.raises(HolonsError, match="not empty"):
        api.distill(TINY, data=karyotypes, out=tmp_path / "run", progress=False)


def test_kmeans_init_takes_one_real_image_from_each_mode_of_a_class():
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([20, 120, 230]).repeat_interleave(torch.tensor([30, 5, 12]))  # unequal modes
    noise = torch.randint(-8, 9, (47, 1, 8, 8), generator=gen)
    images = (levels[:, None, None, None] + noise).to(torch.uint8)
    picks = api.kmeans_representatives(images, 3, seed=0)
    assert sorted(levels[picks].tolist()) == [20, 120, 230]  # a random 3 often miss the 5-image mode
    assert len(set(api.kmeans_representatives(images, 40, seed=1).tolist())) == 40  # distinct images
    with pytest.raises(ValueError, match="distinct"):
        api.kmeans_representatives(images, 48)
    real = RealSet("classification", ["a", "b"], torch.cat([images, 255 - images]),
                   torch.tensor([0] * 47 + [1] * 47), images[:4], torch.tensor([0, 0, 1, 1]))
    cfg = api.resolve_config(DistillConfig, {"match": {"init": "kmeans", "ipc": 3}}, None)
    start, labels = api.initial_images(real, cfg)
    assert labels.tolist() == [0] * 3 + [1] * 3
    assert sorted((start[:3, 0, 0, 0] * 255).round().div(100).round().tolist()) == [0, 1, 2]  # 20 / 120 / 230


def test_keep_background_changes_the_object_and_not_the_empty_canvas(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(40, 1, 16, 16, dtype=torch.uint8)  # objects on an empty (0) canvas
    images[:20, :, 4:12, 6:10] = torch.randint(60, 250, (20, 1, 8, 4), generator=gen, dtype=torch.uint8)
    images[20:, :, 6:10, 3:13] = torch.randint(60, 250, (20, 1, 4, 10), generator=gen, dtype=torch.uint8)
    real = RealSet("classification", ["tall", "wide"], images, torch.tensor([0] * 20 + [1] * 20), images[:4],
                   torch.tensor([0, 0, 1, 1]))
    kept = {"net": {"width": 8}, "evaluate": {"seeds": []}, "device": "cpu",
            "match": {"ipc": 2, "iterations": 10, "real_batch": 8, "lr": 5.0, "checkpoint_every": 100}}
    free = {**kept, "match": {**kept["match"], "keep_background": False}}
    for name, cfg in (("free", free), ("kept", kept)):
        cfg = api.resolve_config(DistillConfig, cfg, None)
        start, _ = api.initial_images(real, cfg)
        (tmp_path / name).mkdir()
        result = api.run_distillation(cfg, real, tmp_path / name)
        table = pd.read_csv(result.manifest)
        out = torch.stack([torch.from_numpy(np.array(Image.open(result.manifest.parent / q)))
                           for q in table["path"]])
        background = start[:, 0] == 0
        assert out[~background].float().sub(start[:, 0][~background] * 255).abs().mean() > 1  # objects learn
        painted = (out[background] > 0).float().mean()
        assert (painted == 0) if name == "kept" else (painted > 0.05)
    noise = api.resolve_config(DistillConfig, {"match": {"init": "noise", "ipc": 2}}, None)
    assert bool((api.initial_images(real, noise)[0] > 0).all())  # nothing empty to keep: no constraint


def test_fyi_matches_each_image_and_its_mirror():
    x = torch.arange(2 * 1 * 3 * 5, dtype=torch.float32).reshape(2, 1, 3, 5)
    assert torch.equal(mirror_by_halves(x), x.flip(-1))
    views, labels = matching_views(x, torch.tensor([0, 1]), fyi=True)
    assert views.shape[0] == 4 and labels.tolist() == [0, 1, 0, 1]
    torch.manual_seed(0)
    net = ConvNet(2, size=16, width=4)
    syn = torch.rand(2, 1, 16, 16)
    y = torch.tensor([0, 1])
    # the real batch is the synthetic images and their mirrors: matched exactly only when the mirror
    # enters the loss
    real, real_y = torch.cat([syn, syn.flip(-1)]), torch.cat([y, y])
    assert dm_loss(net, real, real_y, syn, y, 2, fyi=True) < 1e-8
    assert dm_loss(net, real, real_y, syn, y, 2, fyi=False) > 1e-4
    # the gradient reaches the synthetic image through its mirror as well
    s = syn.clone().requires_grad_(True)
    dm_loss(net, syn.flip(-1), y, s, y, 2, fyi=True).backward()
    assert s.grad.abs().sum() > 0


def test_dm_loss_decreases_under_a_fixed_network():
    torch.manual_seed(0)
    net = ConvNet(3, size=16, width=8)
    for p in net.parameters():
        p.requires_grad_(False)
    real = torch.rand(12, 1, 16, 16) * torch.linspace(0, 1, 16)  # a left-to-right ramp per class
    real_y = torch.arange(3).repeat_interleave(4)
    syn = torch.rand(3, 1, 16, 16, requires_grad=True)
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    losses = []
    for _ in range(15):
        loss = dm_loss(net, real, real_y, syn, torch.arange(3), 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_siamese_poses_move_a_class_real_and_synthetic_images_alike():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    labels = torch.tensor([0, 0, 1, 1])
    identity = class_poses(2, gen, translate=0.0, scale=0.0, flip=False)
    assert torch.allclose(posed(x, labels, identity), x, atol=1e-5)
    mirror = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]], [[1.0, 0, 0], [0, 1.0, 0]]])
    moved = posed(x, labels, mirror)
    assert torch.allclose(moved[:2], x[:2].flip(-1), atol=1e-5)
    assert torch.allclose(moved[2:], x[2:], atol=1e-5)
    poses = class_poses(2, gen, translate=0.125, scale=0.1, flip=True)
    assert not torch.allclose(poses[0], poses[1])
    # a synthetic set equal to the real one stays matched under any shared pose, and the loss is
    # differentiable through the pose
    torch.manual_seed(0)
    net = ConvNet(2, size=16, width=4)
    syn = x.clone().requires_grad_(True)
    loss = dm_loss(net, x, labels, syn, labels, 2, poses=poses)
    assert loss < 1e-8
    dm_loss(net, x.flip(-1), labels, syn, labels, 2, poses=poses).backward()
    assert syn.grad.abs().sum() > 0


def test_gradient_matching_is_differentiable_in_the_images():
    torch.manual_seed(0)
    net = ConvNet(2, size=16, width=4)
    syn = torch.rand(2, 1, 16, 16, requires_grad=True)
    real, real_y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1] * 3)
    poses = class_poses(2, torch.Generator().manual_seed(0), translate=0.1, scale=0.1, flip=True)
    loss = gm_loss(net, real, real_y, syn, torch.tensor([0, 1]), 2, fyi=True, poses=poses)
    loss.backward()
    assert torch.isfinite(loss) and syn.grad.abs().sum() > 0


def test_interrupted_run_resumes_exactly(karyotypes, tmp_path, monkeypatch):
    cfg = {**TINY, "match": {**TINY["match"], "iterations": 5, "method": "gm", "gm_inner_steps": 2},
           "evaluate": {"seeds": []}}
    api.distill(cfg, data=karyotypes, out=tmp_path / "whole", progress=False)
    fresh = api._fresh_net

    def stop_at_two(cfg_, real, device, iteration):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop checkpoints at the next iteration and stops
        return fresh(cfg_, real, device, iteration)

    monkeypatch.setattr(api, "_fresh_net", stop_at_two)
    with pytest.raises(api.DistillInterrupted):
        api.distill(cfg, data=karyotypes, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(api, "_fresh_net", fresh)
    assert torch.load(tmp_path / "cut" / api.CHECKPOINT, weights_only=True)["iteration"] == 3
    api.distill(cfg, data=karyotypes, out=tmp_path / "cut", resume=True, progress=False)
    whole = torch.load(tmp_path / "whole" / api.CHECKPOINT, weights_only=True)["syn"]
    assert torch.equal(whole, torch.load(tmp_path / "cut" / api.CHECKPOINT, weights_only=True)["syn"])
    with pytest.raises(HolonsError, match="config differs"):
        api.distill({**cfg, "net": {"width": 4}}, data=karyotypes, out=tmp_path / "cut", resume=True)


def _expert_steps(net: ConvNet, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The parameters of a copy of ``net`` after ``steps`` plain SGD steps on ``x`` (a stand-in expert)."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return flat_parameters(net)


def test_trajectory_matching_moves_the_images_towards_the_expert():
    torch.manual_seed(0)
    net = ConvNet(3, size=16, width=8)
    start = flat_parameters(net)
    unflattened = as_parameters(start, net).values()
    assert all(torch.equal(v, p) for v, p in zip(unflattened, net.parameters(), strict=True))
    real = torch.rand(12, 1, 16, 16) * torch.linspace(0, 1, 16)
    real_y = torch.arange(3).repeat_interleave(4)
    target = _expert_steps(net, real, real_y, steps=10, lr=0.1)
    syn = torch.rand(6, 1, 16, 16, requires_grad=True)
    syn_y = torch.arange(3).repeat_interleave(2)

    def loss_with(lr: torch.Tensor) -> torch.Tensor:
        return trajectory_loss(net, syn, syn_y, start, target, lr, steps=3, batch_size=4,
                               generator=torch.Generator().manual_seed(0), hflip=True)

    # no step at all leaves the parameters at the start: the normalised distance is exactly 1
    assert loss_with(torch.tensor(0.0)).item() == pytest.approx(1.0)
    syn_lr = torch.tensor(0.1, requires_grad=True)
    opt = torch.optim.SGD([syn], lr=100.0)
    losses = []
    for _ in range(20):
        loss = loss_with(syn_lr)
        opt.zero_grad()
        loss.backward()
        assert syn_lr.grad is not None and torch.isfinite(syn_lr.grad)
        opt.step()
        with torch.no_grad():
            syn.clamp_(0, 1)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_trajectory_matching_run_resumes_exactly(karyotypes, tmp_path, monkeypatch):
    cfg = {**TINY, "match": {**TINY["match"], "iterations": 4, "method": "mtt", "lr": 100.0,
                             "mtt_syn_steps": 2, "mtt_batch": 8, "mtt_max_start": 1, "mtt_span": 1},
           "experts": {"count": 2, "epochs": 2, "batch_size": 16}, "evaluate": {"seeds": []}}
    whole = api.distill(cfg, data=karyotypes, out=tmp_path / "whole", progress=False)
    assert (tmp_path / "whole" / api.EXPERTS_FILE).is_file() and whole.summary["syn_lr"] > 0
    assert len(torch.load(tmp_path / "whole" / api.EXPERTS_FILE, weights_only=True)["trajectories"]) == 2
    assert whole.summary["mean_abs_change_from_init"] > 0
    real_loss, calls = api._trajectory_loss, []

    def stop_at_two(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    monkeypatch.setattr(api, "_trajectory_loss", stop_at_two)
    with pytest.raises(api.DistillInterrupted):
        api.distill(cfg, data=karyotypes, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(api, "_trajectory_loss", real_loss)
    api.distill(cfg, data=karyotypes, out=tmp_path / "cut", resume=True, progress=False)
    a = torch.load(tmp_path / "whole" / api.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / api.CHECKPOINT, weights_only=True)
    assert torch.equal(a["syn"], b["syn"]) and a["syn_lr"] == b["syn_lr"]
    # a finished run with its experts starts over with --overwrite, the experts trained anew
    cfg["experts"] = {**cfg["experts"], "count": 1}
    api.distill(cfg, data=karyotypes, out=tmp_path / "whole", overwrite=True, progress=False)
    assert len(torch.load(tmp_path / "whole" / api.EXPERTS_FILE, weights_only=True)["trajectories"]) == 1


def test_evaluation_can_score_the_validation_cells_instead_of_the_test_cells(tmp_path):
    from holons.data.synthetic.karyotypes import generate_karyotypes

    karyotypes = generate_karyotypes(tmp_path / "kt", cases=8, seed=1, abnormal_rate=0.0, workers=1,
                                     progress=False)
    cfg = {**TINY, "data": {**TINY["data"], "test_fraction": 0.25, "val_fraction": 0.25},
           "match": {**TINY["match"], "iterations": 0}}
    on_test = api.distill(cfg, data=karyotypes, out=tmp_path / "test", progress=False).summary
    on_val = api.distill({**cfg, "data": {**cfg["data"], "eval_split": "val"}}, data=karyotypes,
                         out=tmp_path / "val", progress=False).summary
    assert on_val["real_set"]["eval_split"] == "val" and on_test["real_set"]["eval_split"] == "test"
    assert on_val["test_images"] == on_val["real_set"]["val_chromosomes"] > 0
    assert on_val["train_images"] == on_test["train_images"]  # the same training cells either way
    with pytest.raises(HolonsError, match="no validation split"):
        csv = tmp_path / "set.csv"
        csv.write_text("path,label\na.png,x\n")
        api.distill({**TINY, "data": {"eval_split": "val"}}, data=csv, out=tmp_path / "csv", progress=False)


def test_trajectory_matching_needs_experts_long_enough():
    with pytest.raises(ConfigError, match="experts.epochs"):
        DistillConfig(match=DistillMatchConfig(method="mtt", mtt_max_start=4, mtt_span=2),
                      experts=DistillExpertConfig(epochs=5))


def test_cli_distills_radiograph_findings_to_a_path_label_manifest(tmp_path, capsys):
    from holons.data.synthetic.radiographs import generate_radiographs

    root = tmp_path / "ph"
    generate_radiographs(root, n=18, seed=0, size=32, formats=("png",), findings_rate=0.5, workers=1,
                         progress=False)
    out = tmp_path / "run"
    rc = main(["distill", "--data", str(root), "--out", str(out), "--ipc", "1", "--iterations", "2", "--fyi",
               "data.size=16", "net.width=4", "evaluate.steps=2", "device=cpu", "--eval-seeds", "0"])
    assert rc == 0
    manifest = pd.read_csv(out / "distilled" / "manifest.csv", dtype=str)
    assert list(manifest.columns) == ["path", "label"] and sorted(manifest["label"]) == ["0", "1"]
    assert all((out / "distilled" / p).is_file() for p in manifest["path"])
    summary = json.loads((out / api.SUMMARY_FILE).read_text())
    assert summary["kind"] == "classification" and summary["fyi"] is True
    assert summary["evaluation"]["hflip"] is False  # radiographs keep their laterality
    assert "distilled: test accuracy" in capsys.readouterr().out
    assert main(["distill", "--data", str(root), "--out", str(out)]) == 2
