"""Building blocks of holons.ssl: backbone, heads, losses, EMA teacher, schedules, optimizer helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from holons.errors import ConfigError
from holons.ssl import (
    CompositionHead,
    DecompositionHead,
    LocalizabilityHead,
    LocalizabilityLoss,
    clip_gradients_per_tensor,
    composition_loss,
    cosine_schedule,
    create_backbone,
    decomposition_loss,
    lr_schedule,
    make_teacher,
    mix_teacher_probs,
    momentum_schedule,
    param_groups,
    scaled_lr,
    set_lr,
    set_weight_decay,
    update_teacher,
    view_pairs,
    weight_decay_schedule,
)


@pytest.fixture(autouse=True)
def _seeded(one_thread):
    torch.manual_seed(0)


# ---------------------------------------------------------------- localizability loss


def test_cross_entropy_of_identical_distributions_is_their_entropy():
    loss_fn = LocalizabilityLoss(out_dim=16, teacher_temp=0.04, student_temp=0.1)
    teacher = 0.1 * torch.randn(5, 16)  # cosine-sized logits: a soft but peaked teacher
    student = teacher * (0.1 / 0.04)  # s / tau_s == t / tau_t, centre is zero
    log_p = F.log_softmax(teacher / 0.04, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    assert 0.5 < entropy < math.log(16) - 0.5
    out = loss_fn([student], [teacher])
    assert torch.allclose(out.loss, entropy, atol=1e-5)
    assert torch.allclose(out.teacher_entropy, entropy, atol=1e-5)
    # KL >= 0: any other student costs more than the entropy
    assert loss_fn([torch.randn(5, 16)], [teacher]).loss > entropy


def test_loss_nonnegative_and_decreases_as_student_moves_to_teacher():
    loss_fn = LocalizabilityLoss(out_dim=32)
    teacher = torch.randn(4, 32)
    matched = teacher * (0.1 / 0.04)
    start = torch.randn(4, 32)
    values = [loss_fn([(1 - a) * start + a * matched], [teacher]).loss.item() for a in (0.0, 0.3, 0.6, 1.0)]
    assert all(v >= 0 for v in values)
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


def test_gradient_reaches_student_only():
    loss_fn = LocalizabilityLoss(out_dim=8)
    student = torch.randn(3, 8, requires_grad=True)
    teacher = torch.randn(3, 8, requires_grad=True)
    loss_fn([student], [teacher]).loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_same_view_exclusion_and_explicit_pairs():
    assert view_pairs(3, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert view_pairs(3, 2, exclude_same_view=True) == [(0, 1), (1, 0), (2, 0), (2, 1)]
    # part-whole stage: teacher views [W, part0, part1]; a part-local crop predicts W and its part
    assert view_pairs(3, 3, targets=[0, 0, [0, 2]]) == [(0, 0), (1, 0), (2, 0), (2, 2)]
    with pytest.raises(ValueError):
        view_pairs(2, 1, targets=[0, 1])

    loss_fn = LocalizabilityLoss(out_dim=10)
    s = [torch.randn(4, 10) for _ in range(3)]
    t = [torch.randn(4, 10) for _ in range(2)]

    def ce(si, ti):
        p = loss_fn.teacher_probs(t[ti])
        return -(p * F.log_softmax(s[si] / 0.1, dim=-1)).sum(-1).mean()

    expected = (ce(0, 1) + ce(1, 0) + ce(2, 0) + ce(2, 1)) / 4
    got = loss_fn(s, t, exclude_same_view=True).loss
    assert torch.allclose(got, expected, atol=1e-6)
    all_pairs = loss_fn(torch.stack(s), torch.stack(t)).loss  # V x B x K form
    assert not torch.allclose(got, all_pairs)
    explicit = loss_fn(s, t, pairs=[(2, 1)]).loss
    assert torch.allclose(explicit, ce(2, 1), atol=1e-6)


def test_mixed_teacher_targets():
    loss_fn = LocalizabilityLoss(out_dim=6)
    teacher = torch.randn(4, 6)
    p = loss_fn.teacher_probs(teacher)
    partner = torch.tensor([1, 0, 3, 2])
    lam = torch.tensor([1.0, 0.0, 0.25, 0.7])
    mixed = mix_teacher_probs(p, partner, lam)
    assert torch.allclose(mixed.sum(-1), torch.ones(4))
    assert torch.allclose(mixed[0], p[0]) and torch.allclose(mixed[1], p[0])
    assert torch.allclose(mixed[2], 0.25 * p[2] + 0.75 * p[3])
    assert torch.allclose(mix_teacher_probs(p, partner, 1.0), p)
    student = torch.randn(4, 6)
    direct = loss_fn([student], teacher_probs=[p]).loss
    assert torch.allclose(direct, loss_fn([student], [teacher]).loss)
    with pytest.raises(ValueError):
        loss_fn([student])


def test_center_update_math_without_distributed():
    loss_fn = LocalizabilityLoss(out_dim=4, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    t2 = torch.tensor([[0.0, 0.0, 0.0, 8.0]])
    loss_fn.update_center([t1, t2])
    mean = torch.cat([t1, t2]).mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, 0.1 * mean)
    loss_fn.update_center([t1, t2])
    assert torch.allclose(loss_fn.center, 0.9 * 0.1 * mean + 0.1 * mean)
    out = loss_fn([t1], [t1])
    assert torch.allclose(out.center_norm, loss_fn.center.norm())
    # centring: a constant shift of the teacher logits that equals the centre is removed
    assert torch.allclose(loss_fn.teacher_probs(t1 + loss_fn.center), F.softmax(t1 / 0.04, dim=-1), atol=1e-6)


def _center_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss_fn = LocalizabilityLoss(out_dim=3, center_momentum=0.5)
        rows = torch.arange(9.0).reshape(3, 3)
        loss_fn.update_center(rows[:1] if rank == 0 else rows[1:])  # unequal batches per rank
        if rank == 0:
            torch.save(loss_fn.center, result_file)
    finally:
        dist.destroy_process_group()


def test_center_is_all_reduced_across_ranks(tmp_path):
    args = (str(tmp_path / "init"), str(tmp_path / "center.pt"))
    torch.multiprocessing.start_processes(_center_worker, args=args, nprocs=2, start_method="fork")
    center = torch.load(tmp_path / "center.pt", weights_only=True)
    assert torch.allclose(center, 0.5 * torch.arange(9.0).reshape(3, 3).mean(0, keepdim=True))


def test_collapse_diagnostics():
    loss_fn = LocalizabilityLoss(out_dim=8)
    uniform = loss_fn([torch.zeros(4, 8)], [torch.zeros(4, 8)])
    assert math.isclose(uniform.teacher_entropy.item(), math.log(8), rel_tol=1e-5)
    same = torch.zeros(4, 8)
    same[:, 3] = 10.0
    collapsed = loss_fn([same], [same])
    assert collapsed.teacher_entropy < 1e-3 and collapsed.teacher_batch_entropy < 1e-3


# ---------------------------------------------------------------- composition / decomposition losses


def test_embedding_losses_reductions():
    pred = F.normalize(torch.randn(5, 16), dim=-1)
    target = torch.randn(5, 16) * 3.0  # normalized inside
    cos = F.cosine_similarity(pred, target, dim=-1)
    assert torch.allclose(composition_loss(pred, target), (2 - 2 * cos).mean(), atol=1e-5)
    plain_mse = composition_loss(pred, target, reduction="mean")
    assert torch.allclose(plain_mse, (2 - 2 * cos).mean() / 16, atol=1e-6)
    assert composition_loss(target, target).item() < 1e-10
    parts_pred = F.normalize(torch.randn(2, 4, 16), dim=-1)
    parts_target = torch.randn(2, 4, 16)
    cos_parts = F.cosine_similarity(parts_pred, parts_target, dim=-1)
    assert torch.allclose(decomposition_loss(parts_pred, parts_target), (2 - 2 * cos_parts).mean(), atol=1e-5)
    with pytest.raises(ValueError):
        decomposition_loss(parts_pred, parts_target[:, :3])
    with pytest.raises(ValueError):
        composition_loss(pred, target, reduction="sum")


# ---------------------------------------------------------------- heads


def test_localizability_head_shapes_and_unit_prototypes():
    head = LocalizabilityHead(24, out_dim=50, hidden=32, bottleneck=16)
    out = head(torch.randn(3, 24))
    assert out.shape == (3, 50)
    assert out.abs().max() <= 1.0 + 1e-5  # cosine logits
    assert torch.allclose(head.normalized_prototypes().norm(dim=1), torch.ones(50), atol=1e-5)
    x = torch.randn(3, 24)
    before = head(x)
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the gain is fixed at 1: scaling the raw weight changes nothing
    assert torch.allclose(head(x), before, atol=1e-6)
    assert len([m for m in head.mlp if isinstance(m, nn.Linear)]) == 3


@pytest.mark.parametrize("how", ["requires_grad", "cancel"])
def test_localizability_head_last_layer_freeze(how):
    head = LocalizabilityHead(8, out_dim=12, hidden=16, bottleneck=8)
    before = head.last_layer.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(head, 0.04), lr=1e-2)
    if how == "requires_grad":
        head.set_last_layer_trainable(False)
    head(torch.randn(4, 8)).logsumexp(-1).mean().backward()
    if how == "cancel":
        head.cancel_last_layer_grad()
    assert head.last_layer.weight.grad is None
    assert head.mlp[0].weight.grad is not None
    opt.step()
    assert torch.equal(head.last_layer.weight, before)
    head.set_last_layer_trainable(True)
    head(torch.randn(4, 8)).logsumexp(-1).mean().backward()
    assert head.last_layer.weight.grad is not None and head.last_layer.weight.grad.abs().sum() > 0


def test_composition_head_shape_and_raster_order():
    head = CompositionHead(embed_dim=8, k2=4)
    parts = torch.randn(2, 4, 8)
    out = head(parts)
    assert out.shape == (2, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    swapped = parts[:, [1, 0, 2, 3]]
    assert not torch.allclose(head(swapped), out, atol=1e-4)
    # raster order = flatten order: part i feeds columns i*D:(i+1)*D of the first layer
    with torch.no_grad():
        head.mlp[0].weight.zero_()
        head.mlp[0].weight[:, 8:16] = torch.eye(8)  # only part 1 is wired through
    v = torch.randn(8)
    blank = head(torch.zeros(1, 4, 8))
    for i in range(4):
        probe = torch.zeros(1, 4, 8)
        probe[0, i] = v
        assert torch.allclose(head(probe), blank) == (i != 1)
    with pytest.raises(ValueError):
        head(torch.randn(2, 3, 8))


@pytest.mark.parametrize("k", [2, 3])
def test_decomposition_head_chunks(k):
    k2 = k * k
    d = 32
    head = DecompositionHead(embed_dim=d, k2=k2)
    whole = torch.randn(5, d)
    chunks = head(whole)
    assert chunks.shape == (5, k2, d)
    assert torch.allclose(chunks.norm(dim=-1), torch.ones(5, k2), atol=1e-5)
    # chunk i is rows i*D:(i+1)*D of the last layer: changing those rows moves chunk i only
    with torch.no_grad():
        head.mlp[2].weight[d : 2 * d] += 1.0
    moved = (head(whole) - chunks).abs().amax(dim=(0, 2))
    assert moved[1] > 1e-3 and torch.all(moved[torch.arange(k2) != 1] < 1e-6)

    joint = DecompositionHead(embed_dim=d, k2=k2, normalize="joint")
    norms = joint(whole).norm(dim=-1)
    assert torch.allclose((norms**2).sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(norms.pow(2).mean(-1).sqrt(), torch.full((5,), 1.0 / k), atol=1e-5)
    # the joint variant cannot reach zero loss against unit-norm targets; per-chunk can
    target = chunks.detach()
    assert decomposition_loss(chunks, target) < 1e-10
    # even with targets along its own chunks the loss is mean (1 - |chunk|)^2 >= (1 - 1/k)^2
    assert decomposition_loss(joint(whole), joint(whole).detach()) >= (1 - 1 / k) ** 2 - 1e-6
    with pytest.raises(ValueError):
        DecompositionHead(6, 4, normalize="other")


def test_head_state_dicts_round_trip_weights_only(tmp_path):
    heads = {
        "loc": LocalizabilityHead(8, out_dim=10, hidden=16, bottleneck=4),
        "comp": CompositionHead(8, 4),
        "dec": DecompositionHead(8, 4),
    }
    loss_fn = LocalizabilityLoss(10)
    loss_fn.update_center([torch.randn(3, 10)])
    path = tmp_path / "heads.pt"
    torch.save({**{k: h.state_dict() for k, h in heads.items()}, "loss": loss_fn.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    x = torch.randn(2, 8)
    fresh_loc = LocalizabilityHead(8, out_dim=10, hidden=16, bottleneck=4)
    fresh_loc.load_state_dict(state["loc"])
    assert torch.equal(fresh_loc(x), heads["loc"](x))
    fresh_dec = DecompositionHead(8, 4)
    fresh_dec.load_state_dict(state["dec"])
    assert torch.equal(fresh_dec(x), heads["dec"](x))
    fresh_comp = CompositionHead(8, 4)
    fresh_comp.load_state_dict(state["comp"])
    assert torch.equal(fresh_comp(x[:, None].expand(2, 4, 8)), heads["comp"](x[:, None].expand(2, 4, 8)))
    fresh_loss = LocalizabilityLoss(10)
    fresh_loss.load_state_dict(state["loss"])
    assert torch.equal(fresh_loss.center, loss_fn.center)


# ---------------------------------------------------------------- EMA teacher


def test_ema_update_math():
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(8, 3))  # moves BN running stats
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = {k: v.clone() for k, v in student.state_dict().items()}

    update_teacher(student, teacher, momentum=0.9)
    for name, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * t0[name] + 0.1 * s[name], atol=1e-7)
    for name, b in teacher.named_buffers():
        assert torch.equal(b, s[name])

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(student, teacher, momentum=1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name])

    update_teacher(nn.parallel.DataParallel(student), teacher, momentum=0.0)  # unwraps
    for name, p in teacher.named_parameters():
        assert torch.equal(p, s[name])
    with pytest.raises(ValueError):
        update_teacher(nn.Linear(3, 4), teacher, momentum=0.5)


# ---------------------------------------------------------------- schedules


def test_momentum_schedule():
    m = momentum_schedule(100)
    assert len(m) == 100
    assert m[0] == pytest.approx(0.996)
    assert m[-1] == 1.0
    assert np.all(np.diff(m) >= 0)


def test_lr_and_weight_decay_schedules():
    assert scaled_lr(5e-4, 512) == pytest.approx(1e-3)
    peak = scaled_lr(5e-4, 64)
    lr = lr_schedule(peak, total_steps=50, warmup_steps=10)
    assert len(lr) == 50
    assert lr[0] == 0.0
    assert np.all(np.diff(lr[:11]) > 0)
    assert lr[10] == pytest.approx(peak)
    assert lr.max() == pytest.approx(peak)
    assert lr[-1] == pytest.approx(1e-6)
    assert np.all(np.diff(lr[10:]) <= 0)
    wd = weight_decay_schedule(30)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    assert np.all(np.diff(wd) >= 0)
    only_warmup = cosine_schedule(1.0, 0.0, 5, warmup_steps=5, warmup_start=0.5)
    assert np.allclose(only_warmup, [0.5, 0.6, 0.7, 0.8, 0.9])
    assert cosine_schedule(2.0, 1.0, 1).tolist() == [1.0]
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)


# ---------------------------------------------------------------- optimizer helpers


def test_param_groups_and_setters():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Conv2d(1, 2, 3))
    head = LocalizabilityHead(5, out_dim=7, hidden=8, bottleneck=3)
    head.set_last_layer_trainable(False)  # frozen parameters still belong to a group
    groups = param_groups([model, head, model], weight_decay=0.04)
    decay, no_decay = groups
    n_all = len(list(model.parameters())) + len(list(head.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_all
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert any(p is head.last_layer.weight for p in decay["params"])
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_weight_decay(opt, 0.3)
    set_lr(opt, 0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


def test_clip_gradients_per_tensor():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 10.0)
    model.bias.grad = torch.tensor([0.3, 0.4])
    norms = clip_gradients_per_tensor(model, max_norm=3.0)
    assert torch.allclose(norms, torch.tensor([math.sqrt(600.0), 0.5]))
    assert model.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.allclose(model.weight.grad, torch.full((2, 3), 3.0 / math.sqrt(6.0)), atol=1e-5)
    assert torch.equal(model.bias.grad, torch.tensor([0.3, 0.4]))  # small tensor untouched


# ---------------------------------------------------------------- backbone


@pytest.mark.parametrize(("name", "dim", "pyramid"), [("convnext_atto", 320, 4), ("resnet18", 512, 5)])
def test_backbone_shapes(name, dim, pyramid):
    backbone = create_backbone(name).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        emb = backbone(x)
        dense = backbone.forward_dense(x)
        maps = backbone.forward_pyramid(x)
    assert backbone.embed_dim == dim and emb.shape == (2, dim)
    assert dense.shape == (2, dim, 2, 2)
    assert len(maps) == pyramid == len(backbone.feature_channels())
    assert [m.shape[1] for m in maps] == backbone.feature_channels()
    assert maps[-1].shape[-1] == 2 and maps[0].shape[-1] > maps[-1].shape[-1]
    with torch.no_grad():
        assert torch.allclose(dense, backbone.model.forward_features(x), atol=1e-6)
    if name == "resnet18":  # plain average pooling: the embedding is the mean of the dense map
        assert torch.allclose(dense.mean(dim=(2, 3)), emb, atol=1e-5)


def test_vit_backbone_dense_grid():
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert backbone(x).shape == (1, 192)
        assert backbone.forward_dense(x).shape == (1, 192, 2, 2)
        assert len(backbone.forward_pyramid(x)) == 2


def test_backbone_errors_and_local_dir(tmp_path):
    with pytest.raises(ConfigError):
        create_backbone("no_such_model_xyz")
    with pytest.raises(ConfigError):
        create_backbone("resnet18", pretrained_dir=tmp_path)
    from timm.models import save_for_hf

    source = create_backbone("resnet18").eval()
    save_for_hf(source.model, tmp_path, safe_serialization=True)
    loaded = create_backbone("resnet18", pretrained_dir=tmp_path).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    with pytest.raises(ConfigError):
        create_backbone("convnext_atto", pretrained_dir=tmp_path)


def test_components_compose_into_one_training_step():
    """Backbone + three heads + losses + clipping + AdamW + EMA: one step moves the teacher, finitely."""
    k2, views = 4, 2
    student = nn.ModuleDict(
        {
            "backbone": create_backbone("resnet18"),
            "loc": LocalizabilityHead(512, out_dim=64, hidden=32, bottleneck=16),
        }
    )
    comp, dec = CompositionHead(512, k2), DecompositionHead(512, k2)
    teacher = make_teacher(student)
    loss_fn = LocalizabilityLoss(64)
    opt = torch.optim.AdamW(param_groups([student, comp, dec], 0.04), lr=1e-3)
    whole, parts = torch.rand(2, 1, 32, 32), torch.rand(2 * k2, 1, 32, 32)
    crops = torch.rand(views * 2, 1, 32, 32)

    with torch.no_grad():
        t_whole = teacher["backbone"](whole)
        t_parts = teacher["backbone"](parts).unflatten(0, (2, k2))
        t_logits = teacher["loc"](t_whole)
    s_logits = student["loc"](student["backbone"](crops)).unflatten(0, (views, 2))
    loc = loss_fn(s_logits, [t_logits])
    s_parts = student["backbone"](parts).unflatten(0, (2, k2))
    total = loc.loss + composition_loss(comp(s_parts), t_whole)
    total = total + decomposition_loss(dec(student["backbone"](whole)), t_parts)
    total.backward()
    student["loc"].cancel_last_layer_grad()
    clip_gradients_per_tensor([student, comp, dec], 3.0)
    opt.step()
    loss_fn.update_center(t_logits)
    before = [p.clone() for p in teacher.parameters()]
    update_teacher(student, teacher, momentum=0.9)
    assert torch.isfinite(total)
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert loss_fn.center.abs().sum() > 0

    with torch.autocast("cpu", dtype=torch.bfloat16):  # half-precision logits: loss still float32
        out = loss_fn(s_logits.detach().bfloat16(), [t_logits.bfloat16()])
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_embed_dim_matches_pooled_output_for_models_with_a_head_stage():
    from holons.ssl.backbone import create_backbone

    for name in ("mobilenetv3_small_100", "resnet18"):
        bb = create_backbone(name).eval()
        with torch.no_grad():
            assert bb(torch.zeros(1, 1, 64, 64)).shape[1] == bb.embed_dim


# ---------------------------------------------------------------- Sinkhorn-Knopp teacher


def _shared_component_logits(b: int = 16, k: int = 32) -> torch.Tensor:
    """Teacher logits of near-identical inputs: a large component common to all samples plus small noise."""
    common = 5.0 * torch.randn(1, k)
    return common + 0.05 * torch.randn(b, k)


def test_sinkhorn_rows_are_distributions_and_prototypes_equipartitioned():
    from holons.ssl.losses import sinkhorn_knopp_probs

    b, k = 16, 32
    logits = _shared_component_logits(b, k)
    probs = sinkhorn_knopp_probs(logits, teacher_temp=0.04, n_iters=3)
    assert probs.shape == (b, k) and probs.dtype == torch.float32 and torch.isfinite(probs).all()
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(b), atol=1e-5)
    # each prototype gets about B / K of the batch's mass
    assert torch.allclose(probs.sum(0), torch.full((k,), b / k), rtol=0.05)
    # plain centring + sharpening with a fresh centre: every sample picks the same prototype
    centred = LocalizabilityLoss(out_dim=k).teacher_probs(logits)
    assert (centred.argmax(1) == centred[0].argmax()).all() and centred.max(1).values.min() > 0.99
    assert centred.sum(0).max() > 0.9 * b


def test_sinkhorn_is_stable_for_sharp_temperatures_and_half_inputs():
    from holons.ssl.losses import sinkhorn_knopp_probs

    logits = (200.0 * torch.randn(8, 16)).half()  # exp(t / 0.01) overflows float32 without the max
    probs = sinkhorn_knopp_probs(logits, teacher_temp=0.01, n_iters=5)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(1), torch.ones(8), atol=1e-4)


def test_sinkhorn_loss_option_gives_no_teacher_gradient():
    loss_fn = LocalizabilityLoss(out_dim=32, centering="sinkhorn", sinkhorn_iters=3)
    teacher = _shared_component_logits().requires_grad_(True)
    student = torch.randn(16, 32, requires_grad=True)
    probs = loss_fn.teacher_probs(teacher)
    assert not probs.requires_grad
    out = loss_fn([student], [teacher])
    out.loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # targets are the Sinkhorn-Knopp ones, not softmax((t - c) / T)
    from holons.ssl.losses import sinkhorn_knopp_probs

    assert torch.allclose(probs, sinkhorn_knopp_probs(teacher, 0.04, 3))
    # the centre is still tracked for diagnostics
    loss_fn.update_center([teacher])
    assert loss_fn.center.norm() > 0
    with pytest.raises(ValueError, match="centering"):
        LocalizabilityLoss(out_dim=4, centering="median")
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        LocalizabilityLoss(out_dim=4, centering="sinkhorn", sinkhorn_iters=0)


def _sinkhorn_worker(rank: int, init_file: str, result_file: str, logits: torch.Tensor) -> None:
    import torch.distributed as dist

    from holons.ssl.losses import sinkhorn_knopp_probs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = logits[:3] if rank == 0 else logits[3:]  # unequal batches per rank
        torch.save(sinkhorn_knopp_probs(local, 0.1, 3), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_uses_the_global_batch_across_ranks(tmp_path):
    from holons.ssl.losses import sinkhorn_knopp_probs

    logits = torch.randn(8, 6)
    args = (str(tmp_path / "init"), str(tmp_path / "probs"), logits)
    torch.multiprocessing.start_processes(_sinkhorn_worker, args=args, nprocs=2, start_method="fork")
    per_rank = torch.cat([torch.load(tmp_path / f"probs.{r}", weights_only=True) for r in (0, 1)])
    assert torch.allclose(per_rank, sinkhorn_knopp_probs(logits, 0.1, 3), atol=1e-6)


def test_config_with_sinkhorn_centering_loads():
    from pathlib import Path

    from holons.config import load_config
    from holons.ssl.config import PretrainConfig, validate

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "cpu_tiny.yaml"
    cfg = load_config(PretrainConfig, yaml_path, ["loss.centering=sinkhorn", "loss.sinkhorn_iters=5"])
    assert cfg.loss.centering == "sinkhorn" and cfg.loss.sinkhorn_iters == 5
    validate(cfg)
    assert load_config(PretrainConfig, yaml_path).loss.centering == "center"
    with pytest.raises(ConfigError, match="centering"):
        load_config(PretrainConfig, yaml_path, ["loss.centering=median"])
    with pytest.raises(ConfigError, match="sinkhorn_iters"):
        validate(load_config(PretrainConfig, yaml_path, ["loss.sinkhorn_iters=0"]))


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    from holons.ssl import koleo_loss

    # three unit vectors: e0, e1 and (e0 + e1)/sqrt2 -> nearest distances d(e0, m), d(e1, m), d(m, e0)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2 ** -0.5, 2 ** -0.5]])
    d = math.sqrt(2 - 2 * 2 ** -0.5)
    assert koleo_loss(z).item() == pytest.approx(-math.log(d), rel=1e-5)
    # inputs are normalized first: scaling rows changes nothing
    assert koleo_loss(z * torch.tensor([[3.0], [0.5], [7.0]])).item() == pytest.approx(-math.log(d), rel=1e-5)
    # spreading a tight cluster lowers the loss, and the gradient points that way
    tight = F.normalize(torch.tensor([[1.0, 0.01], [1.0, -0.01], [1.0, 0.02]]), dim=1).requires_grad_(True)
    loss = koleo_loss(tight)
    loss.backward()
    stepped = tight.detach() - 0.01 * tight.grad
    assert koleo_loss(stepped) < loss
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.ones(1, 4))


def test_localizability_head_project_then_score_equals_forward():
    head = LocalizabilityHead(16, 32, hidden=24, bottleneck=8)
    x = torch.randn(5, 16)
    z = head.project(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(head.prototype_logits(z), head(x), atol=1e-6)
