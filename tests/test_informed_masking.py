"""Informed masking (MASCOT, ``mask.*``): masks from saliency, the completion and agreement terms, both
methods running with it, and runs with it off unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import tiny_config, write_phantoms

from holons.errors import ConfigError
from holons.runs import list_checkpoints, load_checkpoint
from holons.ssl.backbone import create_backbone
from holons.ssl.config import resolve_config, validate
from holons.ssl.methods import informed_masking as im
from holons.ssl.student import build_student
from holons.ssl.trainer import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = [{"mode": "localizability", "levels": [0], "steps_per_level": 1},
          {"mode": "part_whole", "levels": [0], "steps_per_level": 1}]
TINY_VIT = {"backbone": "vit_tiny_patch16_224",
            "backbone_kwargs": {"img_size": 64, "depth": 2, "num_heads": 2, "embed_dim": 32,
                                "dynamic_img_size": True}}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), n=16)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- masks
def test_masks_pick_the_most_and_least_salient_patches_at_the_requested_ratio():
    # a hand-made 4 x 4 saliency map: patch i has saliency perm[i]
    perm = torch.tensor([3, 15, 0, 7, 12, 1, 9, 14, 2, 5, 11, 8, 13, 4, 10, 6], dtype=torch.float32)
    saliency = torch.stack([perm, perm.flip(0)])
    high, low = im.informed_masks(saliency, 0.25, 0.5)
    assert high.shape == low.shape == (2, 16) and high.dtype == torch.bool
    assert high.sum(1).tolist() == [4, 4] and low.sum(1).tolist() == [8, 8]
    for row in range(2):
        order = saliency[row].argsort(descending=True)
        assert set(high[row].nonzero().flatten().tolist()) == set(order[:4].tolist())
        assert set(low[row].nonzero().flatten().tolist()) == set(order[8:].tolist())
    assert not (high & low).any()  # 25 % + 50 % of distinct saliencies never overlap
    for ratio, count in ((0.1, 2), (0.5, 8), (0.75, 12), (0.99, 15), (0.01, 1)):
        h, lo = im.informed_masks(saliency, ratio, ratio)
        assert h.sum(1).tolist() == lo.sum(1).tolist() == [count, count]


def test_masked_patches_are_filled_and_the_rest_is_untouched():
    x = torch.rand(2, 1, 16, 16) + 1
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = True  # row 1, col 1 of a 4 x 4 grid: pixels 4..7 x 4..7
    mask[1, [0, 15]] = True
    out = im.mask_images(x, mask, grid=4)
    assert (out[0, 0, 4:8, 4:8] == 0).all()
    assert (out[1, 0, :4, :4] == 0).all() and (out[1, 0, 12:, 12:] == 0).all()
    assert (out != 0).sum().item() == 2 * 256 - 3 * 16
    keep = out != 0
    assert torch.equal(out[keep], x[keep])


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_completion_loss_counts_only_the_masked_high_informed_patches(kind):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    high, low = im.informed_masks(torch.rand(3, 16, generator=g), 0.25, 0.25)
    loss = im.completion_loss(pred, target, high, kind)
    # changing the features anywhere outside the high-informed mask (the low-informed patches
    # included) does not change the loss
    pred2, target2 = pred.clone(), target.clone()
    pred2[~high] = torch.randn_like(pred2[~high])
    target2[low] = 10 * torch.randn_like(target2[low])
    assert torch.equal(im.completion_loss(pred2, target2, high, kind), loss)
    # changing them at a masked high-informed patch does
    b, n = high.nonzero()[0].tolist()
    pred2[b, n] = -pred2[b, n] + 3.0
    assert not torch.equal(im.completion_loss(pred2, target2, high, kind), loss)
    # a perfect prediction costs nothing; the target gets no gradient
    assert im.completion_loss(target, target, high, kind).item() == pytest.approx(0.0, abs=1e-6)
    target.requires_grad_(True)
    pred.requires_grad_(True)
    im.completion_loss(pred, target, high, kind).backward()
    assert target.grad is None and pred.grad[~high].abs().sum() == 0 and pred.grad[high].abs().sum() > 0


def test_agreement_loss_pulls_the_two_masked_views_together_and_to_the_teacher():
    e = torch.randn(4, 8)
    assert im.agreement_loss(e, e.clone(), 2 * e).item() == pytest.approx(0.0, abs=1e-6)
    high, low, teacher = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True), \
        torch.randn(4, 8, requires_grad=True)
    loss = im.agreement_loss(high, low, teacher)
    assert 0 < loss.item() < 2
    loss.backward()
    assert teacher.grad is None and high.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- saliency
def test_saliency_kinds_for_cnn_and_vit():
    cnn = create_backbone("convnext_atto")
    vit = create_backbone(TINY_VIT["backbone"], **TINY_VIT["backbone_kwargs"])
    assert im.saliency_kind(cnn, "auto") == "feature_norm" and im.saliency_kind(vit, "auto") == "attention"
    with pytest.raises(ConfigError, match="ViT"):
        im.saliency_kind(cnn, "attention")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        pooled, maps, sal = im.patch_saliency(cnn.eval(), x, "feature_norm")
        assert torch.allclose(pooled, cnn(x), atol=1e-5)  # the pooled embedding of forward
        assert torch.allclose(sal[:, 0], maps.norm(dim=1))
        _, _, sim = im.patch_saliency(cnn, x, "pooled_similarity")
        assert sim.shape == (2, 1, 2, 2) and (sim.abs() <= 1 + 1e-5).all()


def test_vit_attention_saliency_is_the_class_tokens_attention():
    vit = create_backbone(TINY_VIT["backbone"], **TINY_VIT["backbone_kwargs"]).eval()
    attn = vit.model.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path passes the attention weights through attn_drop
    seen = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        _, maps, sal = im.patch_saliency(vit, x, "attention")
    hook.remove()
    assert maps.shape == (2, 32, 4, 4) and sal.shape == (2, 1, 4, 4)
    prefix = vit.model.num_prefix_tokens
    expected = seen[-1][:, :, 0, prefix:].mean(1)  # class token -> patches, mean over heads
    assert torch.allclose(sal.flatten(1), expected, atol=1e-6)


# ----------------------------------------------------------------------------- config
def test_mask_config_is_off_by_default_and_checked(phantoms):
    cfg = resolve_config(tiny_config(phantoms, STAGES))
    assert cfg.mask.enabled is False and build_student(cfg).mask_head is None
    for bad in ("mask.ratio_high=0", "mask.ratio_low=1.0", "mask.grid=1", "mask.w_agree=-1"):
        with pytest.raises(ConfigError, match="mask"):
            validate(resolve_config(tiny_config(phantoms, STAGES), [bad]))
    with pytest.raises(ConfigError, match="mask"):
        resolve_config(tiny_config(phantoms, STAGES), ["mask.saliency=random"])


# ----------------------------------------------------------------------------- runs
@pytest.mark.parametrize("method", ["adamv2", "dino"])
def test_both_methods_train_with_informed_masking(phantoms, tmp_path, method):
    mask = {"enabled": True, "grid": 4, "ratio_high": 0.25, "w_complete": 0.5, "w_agree": 0.25}
    cfg = tiny_config(phantoms, STAGES, method=method, mask=mask)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.status == "finished" and result.nan_steps == 0
    rows = _metrics(tmp_path / "run")
    for row in rows:
        assert math.isfinite(row["loss_complete"]) and math.isfinite(row["loss_agree"])
        others = sum(row[k] for k in ("loss_loc", "loss_comp", "loss_dec") if k in row)
        assert row["loss"] == pytest.approx(others + 0.5 * row["loss_complete"] + 0.25 * row["loss_agree"],
                                             rel=1e-4)
    if method == "adamv2":
        assert "loss_comp" in rows[-1]  # the part-whole stage has both its own terms and the masking terms
    state = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1])
    head = build_student(resolve_config(cfg)).mask_head.state_dict()
    assert state["student"]["mask_head"].keys() == head.keys()
    assert any(not torch.equal(state["student"]["mask_head"][k], head[k]) for k in head)  # it trained


def test_a_masking_run_resumes_bit_exactly(phantoms, tmp_path):
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 2},
              {"mode": "part_whole", "levels": [0], "steps_per_level": 1}]
    mask = {"enabled": True, "grid": 4}
    pretrain(tiny_config(phantoms, stages, mask=mask), tmp_path / "a", progress=False)
    pretrain(tiny_config(phantoms, stages, mask=mask, max_steps=1), tmp_path / "b", progress=False)
    pretrain(tiny_config(phantoms, stages, mask=mask), tmp_path / "b", resume=True, progress=False)
    a, b = (load_checkpoint(list_checkpoints(tmp_path / r / "checkpoints")[-1][1]) for r in "ab")
    assert a["step"] == b["step"] == 3
    for k, t in a["student"]["mask_head"].items():
        assert torch.equal(t, b["student"]["mask_head"][k]), k
    assert [r["loss_complete"] for r in _metrics(tmp_path / "a")] == [
        r["loss_complete"] for r in _metrics(tmp_path / "b")]


def test_a_vit_masks_where_its_teacher_attends(phantoms, tmp_path):
    cfg = tiny_config(phantoms, [{"mode": "localizability", "levels": [0], "steps_per_level": 1}],
                      method="dino", mask={"enabled": True})
    cfg["model"].update(TINY_VIT)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.status == "finished" and math.isfinite(result.last_metrics["loss_complete"])


def test_with_masking_off_a_seeded_run_is_unchanged(phantoms, tmp_path, monkeypatch):
    """The default run and one with mask.enabled=false and every other mask key changed give the same
    metrics and weights, and never reach the masking code (main's runs were compared bit for bit
    when the branch was added: the off path adds nothing to the step)."""
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 1},
              {"mode": "part_whole", "levels": [0], "steps_per_level": 2}]
    pretrain(tiny_config(phantoms, stages), tmp_path / "a", progress=False)

    def unreachable(*_a, **_k):
        raise AssertionError("masking code ran with mask.enabled=false")

    monkeypatch.setattr(im, "patch_saliency", unreachable)
    off = {"enabled": False, "grid": 4, "ratio_high": 0.3, "w_complete": 5.0, "saliency": "pooled_similarity"}
    pretrain(tiny_config(phantoms, stages, mask=off), tmp_path / "b", progress=False)
    strip = [{k: v for k, v in r.items() if not k.startswith("time_") and k != "img_per_s"}
             for r in _metrics(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time_") and k != "img_per_s"}
                     for r in _metrics(tmp_path / "b")]
    assert not any(k in strip[-1] for k in ("loss_complete", "loss_agree"))
    a, b = (load_checkpoint(list_checkpoints(tmp_path / r / "checkpoints")[-1][1]) for r in "ab")
    assert "mask_head" not in a["student"] and a["student"].keys() == b["student"].keys()
    for part in a["student"]:
        for k, t in a["student"][part].items():
            assert torch.equal(t, b["student"][part][k]), (part, k)


def test_the_ablation_spec_turns_masking_on_in_its_masking_arms_only(tmp_path):
    from holons.study.spec import expand_jobs, load_spec
    from holons.study.steps import budget_config

    spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "studies" / "informed_masking.yaml")
    assert spec.primary == "mean_px" and spec.seeds == [0, 1, 2]
    _, jobs = expand_jobs(spec, tmp_path)
    configs = {}
    for job in jobs:
        args = json.loads(job.steps[0].argv[4])
        cfg = budget_config(args["config"], args["steps"], args["seed"], args["cache"],
                            batch_size=args["batch_size"], overrides=args["overrides"])
        configs[(job.arm, job.seed)] = resolve_config(cfg)
    assert {arm for arm, _ in configs} == {"adamv2", "adamv2_mask", "dino_mask"}
    for (arm, seed), cfg in configs.items():
        assert cfg.mask.enabled == arm.endswith("_mask") and cfg.seed == seed
        assert cfg.method == arm.split("_")[0] and cfg.data.batch_size == spec.vars["batch_size"]
    # the same budget: adamv2 with and without masking differ in mask.* alone
    plain, masked = configs[("adamv2", 0)], configs[("adamv2_mask", 0)]
    masked.mask = plain.mask
    assert masked == plain
