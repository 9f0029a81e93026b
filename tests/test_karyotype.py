"""Karyotyping: dispatch, varifocal zoom, polarity flips, data conventions, a short end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from holons.cli import main as cli_main
from holons.config import load_config
from holons.data.synthetic.chromosomes import render_chromosome
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.errors import ConfigError, HolonsError
from holons.finetune.karyotype import api as karyotype_api
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.data import (
    KaryotypeDataset,
    assign_splits,
    flip_vertical,
    group_kfold,
    group_split,
    random_affine,
    random_flips,
    read_karyotype_manifest,
)
from holons.finetune.karyotype.dispatch import (
    count_warnings,
    dispatch_case,
    greedy_dispatch,
    infer_sex,
    optimal_dispatch,
)
from holons.finetune.karyotype.inference import predict_dataset
from holons.finetune.karyotype.karyogram import KARYOGRAM_ROWS, draw_karyogram
from holons.finetune.karyotype.model import (
    CENTRE_RANGE,
    HALF_RANGE,
    VarifocalNet,
    bound_box,
    box_targets,
    varifocal_zoom,
)
from holons.finetune.karyotype.preprocess import Preprocessing, chromosome_crop, network_input
from holons.finetune.karyotype.schedule import final_head, schedule

TINY = "configs/finetune/karyotype_cpu_tiny.yaml"


# --------------------------------------------------------------------------- dispatch
def _case(types: list[int], p: float = 0.9, seed: int = 0) -> np.ndarray:
    """A probability table whose top type per row is ``types`` with probability ``p``."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.0, 1.0, (len(types), 24))
    probs[np.arange(len(types)), types] = 0.0
    probs *= (1 - p) / probs.sum(1, keepdims=True)
    probs[np.arange(len(types)), types] = p
    return probs


def _normal(sex: str) -> list[int]:
    return [t for t in range(22) for _ in range(2)] + ([22, 23] if sex == "XY" else [22, 22])


@pytest.mark.parametrize("sex", ["XX", "XY"])
def test_dispatch_normal_case_unchanged_and_sex(sex):
    types = _normal(sex)
    probs = _case(types)
    for method in ("none", "greedy", "optimal"):
        result = dispatch_case(probs, method)
        assert result.labels.tolist() == types
        assert result.warnings == [] and result.changed == []
        assert result.sex == sex and result.sex_confidence > 0.99


def test_dispatch_trisomy_is_kept_and_named():
    types = _normal("XY") + [20]  # +21
    probs = _case(types, p=0.95)
    for method in ("greedy", "optimal"):
        result = dispatch_case(probs, method)
        assert (result.labels == 20).sum() == 3
        assert result.warnings == ["trisomy 21 (3 copies)"]
    # a third copy with a weak probability is not allowed by the greedy rule
    weak = probs.copy()
    weak[-1, 20], weak[-1, 19] = 0.6, 0.3
    assert (greedy_dispatch(weak) == 20).sum() == 2


def test_dispatch_resolves_ambiguous_pair():
    types = _normal("XX")
    probs = _case(types)
    # one chromosome 5 looks a little more like a 4: three 4s, one 5 before dispatch
    i = types.index(4)
    probs[i, 3], probs[i, 4] = 0.5, 0.45
    assert (probs.argmax(1) == 3).sum() == 3
    for labels in (greedy_dispatch(probs), optimal_dispatch(probs)):
        assert labels.tolist() == types
    result = dispatch_case(probs, "optimal")
    assert result.changed == [{"index": i, "from": "4", "to": "5"}]


def test_dispatch_missing_and_monosomy_and_sex_warnings():
    types = [t for t in _normal("XX") if t != 6]          # chromosome 7 missing entirely
    types.remove(12)                                       # monosomy 13
    types.remove(22)                                       # 45,X-like sex complement
    warnings = count_warnings(np.asarray(types))
    assert "missing 7 (0 copies)" in warnings
    assert "monosomy 13 (1 copy)" in warnings
    assert any(w.startswith("sex chromosomes X ") for w in warnings)


def test_infer_sex_prefers_likely_complement():
    types = _normal("XY")
    probs = _case(types)
    y = types.index(23)
    probs[y, 23], probs[y, 22] = 0.55, 0.40  # a weak Y
    sex, conf, _ = infer_sex(probs)
    assert sex == "XY" and 0.5 < conf < 0.99


# --------------------------------------------------------------------------- zoom
def test_box_stays_in_bounds():
    raw = torch.tensor([[-1e4, -1e4, -1e4], [1e4, 1e4, 1e4], [0.0, 0.0, 0.0]])
    box = bound_box(raw)
    lo, hi = box[:, :2] - box[:, 2:], box[:, :2] + box[:, 2:]
    assert (lo >= 0).all() and (hi <= 1).all()
    assert (box[:, :2] >= CENTRE_RANGE[0]).all() and (box[:, :2] <= CENTRE_RANGE[1]).all()
    assert (2 * box[:, 2] >= 2 * HALF_RANGE[0]).all() and (2 * box[:, 2] <= 0.5).all()
    images = torch.zeros(2, 1, 32, 32)
    images[0, 0, 2:30, 14:18] = 1.0   # long: clamped to the largest box
    images[1, 0, 20:24, 20:24] = 1.0  # small, off-centre: centre clamped to 3/4 at most
    t = box_targets(images)
    assert torch.allclose(t[0], torch.tensor([0.5, 0.5, 0.25]))
    assert torch.allclose(t[1], torch.tensor([0.6875, 0.6875, 0.125]))


def test_zoom_forward_is_hard_crop_and_gradient_reaches_box():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 32, 32)
    raw = torch.zeros(2, 3, requires_grad=True)
    box = bound_box(raw)
    out = varifocal_zoom(images, box, 16, steepness=10.0)
    hard = varifocal_zoom(images, box.detach(), 16)
    assert torch.allclose(out, hard)
    # the centred half-size-3/16 box of a 32 px image covers pixels 10..21: the crop resamples them
    assert torch.allclose(hard[0, 0].mean(), images[0, 0, 10:22, 10:22].mean(), atol=0.05)
    (out * torch.randn_like(out)).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0 and torch.isfinite(raw.grad).all()


def test_sampling_box_gradient_matches_finite_differences_of_the_crop():
    torch.manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 66, 66), 3, stride=1)  # smooth, 64 px
    weights = torch.randn(1, 1, 16, 16)
    box = torch.tensor([[0.45, 0.55, 0.2]], dtype=torch.float64, requires_grad=True)

    def score(b):
        return (varifocal_zoom(images.double(), b, 16, gradient="sampling") * weights).sum()

    score(box).backward()
    eps = 1e-4
    for k in range(3):
        step = torch.zeros(1, 3, dtype=torch.float64)
        step[0, k] = eps
        with torch.no_grad():
            numeric = (score(box + step) - score(box - step)) / (2 * eps)
        assert box.grad[0, k].item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-6)
    # the forward pass is the same hard crop as with the mask gradient
    assert torch.allclose(varifocal_zoom(images, box.float(), 16, gradient="sampling"),
                          varifocal_zoom(images, box.float().detach(), 16))


@pytest.mark.parametrize("gradient", ["mask", "sampling"])
def test_localizer_gets_gradient_from_lnet_loss(gradient):
    cfg = load_config(KaryotypeConfig, TINY, ["model.variant=varifocal", "data.input_size=32",
                                              f"model.box_gradient={gradient}"])
    model = VarifocalNet(cfg.model, 32)
    model.localizer[-1].weight.data.normal_(0, 0.1)
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 6:26, 13:19] = torch.rand(4, 1, 20, 6)
    out = model(x, ("l",))
    torch.nn.functional.cross_entropy(out["l_type"], torch.tensor([0, 1, 2, 3])).backward()
    assert model.localizer[0].weight.grad.abs().sum() > 0


def test_mean_head_averages_the_g_and_l_probabilities():
    cfg = load_config(KaryotypeConfig, TINY, ["model.variant=varifocal", "data.input_size=32"])
    model = VarifocalNet(cfg.model, 32).eval()
    x = torch.rand(3, 1, 32, 32)
    g_t, g_p = model.predict_logits(x, "g")
    l_t, l_p = model.predict_logits(x, "l")
    m_t, m_p = model.predict_logits(x, "mean")
    assert torch.allclose(m_t.exp(), (g_t.softmax(1) + l_t.softmax(1)) / 2, atol=1e-6)
    assert torch.allclose(m_p.softmax(1), (g_p.softmax(1) + l_p.softmax(1)) / 2, atol=1e-6)


# --------------------------------------------------------------------------- data conventions
def test_polarity_flip_consistency():
    images = torch.rand(4, 1, 8, 8)
    polarity = torch.tensor([1, 0, -1, 1])
    flipped, swapped = flip_vertical(images, polarity)
    assert swapped.tolist() == [0, 1, -1, 0]
    assert torch.equal(flipped, images.flip(-2))
    back, again = flip_vertical(flipped, swapped)
    assert torch.equal(back, images) and torch.equal(again, polarity)
    # random flips: every vertically flipped image has its polarity swapped, and only those
    gen = torch.Generator().manual_seed(0)
    up = torch.zeros(64, 1, 8, 8)
    up[:, :, :2] = 1.0  # a mark at the top: stays at the top under horizontal flips only
    out, pol = random_flips(up, torch.ones(64, dtype=torch.long), gen, hflip=True)
    top_marked = out[:, 0, 0].mean(1) == 1.0
    assert torch.equal(top_marked, pol == 1) and 0 < int(pol.sum()) < 64
    # the synthetic generator's polarity-0 chromosome is the vertical flip of polarity 1
    a = render_chromosome(np.random.default_rng(3), 7, polarity=1)
    b = render_chromosome(np.random.default_rng(3), 7, polarity=0)
    assert np.array_equal(a[::-1], b)
    ta, _ = network_input(chromosome_crop(a / 255.0, "gband"), 128, 32)
    tb, _ = network_input(chromosome_crop(b / 255.0, "gband"), 128, 32)
    assert np.allclose(ta[::-1], tb, atol=1e-5) or np.allclose(np.roll(ta[::-1], 1, 0), tb, atol=1e-5)


def test_random_affine_jitter_keeps_the_chromosome_and_its_polarity():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(32, 1, 48, 48)
    images[:, :, 8:40, 20:28] = 1.0      # an upright bar ...
    images[:, :, 8:12, 20:28] = 0.5      # ... with a dimmer top end
    assert torch.allclose(random_affine(images, gen), images, atol=1e-6)  # all magnitudes 0: identity
    out = random_affine(images, gen, degrees=10, scale=0.05, translate=0.05)
    assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.allclose(out, images, atol=1e-3)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # each image draws its own pose
    area = out.sum((1, 2, 3)) / images.sum((1, 2, 3))     # about the same foreground (scale 1 +- 5 %)
    assert float(area.min()) > 0.85 and float(area.max()) < 1.15
    # polarity survives: the dim end stays in the upper half of every image
    rows = torch.arange(48.0)[None, :, None]
    dim = ((out[:, 0] > 0.2) & (out[:, 0] < 0.7)).float()
    bright = (out[:, 0] > 0.9).float()
    centre = lambda m: (m * rows).sum((1, 2)) / m.sum((1, 2))  # noqa: E731
    assert bool((centre(dim) < centre(bright)).all())
    # a shift of exactly `translate` of the side moves a dot by that many pixels
    dot = torch.zeros(1, 1, 40, 40)
    dot[0, 0, 20, 20] = 1.0
    moved = random_affine(dot, torch.Generator().manual_seed(1), translate=0.25)
    y, x = divmod(int(moved.flatten().argmax()), 40)
    assert abs(y - 20) <= 10 and abs(x - 20) <= 10 and (y, x) != (20, 20)


def test_group_splits_are_disjoint_and_seeded():
    groups = [f"s{i // 3}" for i in range(300)]  # 100 slides, 3 chromosomes each
    split = group_split(groups, test_fraction=0.2, val_fraction=0.1, seed=1)
    frame = pd.DataFrame({"g": groups, "s": split})
    assert (frame.groupby("g")["s"].nunique() == 1).all()
    assert frame.groupby("s")["g"].nunique().to_dict() == {"test": 20, "train": 70, "val": 10}
    assert (group_split(groups, test_fraction=0.2, val_fraction=0.1, seed=1) == split).all()
    assert not (group_split(groups, test_fraction=0.2, val_fraction=0.1, seed=2) == split).all()
    folds = group_kfold(groups, 5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    assert (pd.DataFrame({"g": groups, "f": folds}).groupby("g")["f"].nunique() == 1).all()
    cv = assign_splits(groups, test_fraction=0.2, val_fraction=0.1, seed=0, folds=5, fold=2)
    assert set(np.asarray(groups)[cv == "test"]) == set(np.asarray(groups)[folds == 2])
    assert (cv == "val").any()


def test_manifest_layouts(tmp_path, shared_data):
    manifest, skipped = read_karyotype_manifest(shared_data / "chromosomes/pki3_gband/manifest.csv")
    assert skipped == {"label outside 1..24": 1}  # the stray class-25 file
    assert manifest["label"].between(0, 23).all() and (manifest["polarity"] == 1).all()
    assert manifest["group"].nunique() == 372
    karyo, _ = read_karyotype_manifest(shared_data / "chromosomes/karyonet_sample/manifest.csv",
                                       default_polarity=-1)
    sub = karyo[karyo["path"].str.contains("Gband")].head(6)
    ds = KaryotypeDataset(sub, preprocessing=Preprocessing(stain="auto", canvas=256), size=32)
    assert len(ds) == 6 and ds.images[:, :, 0, 0].max() < 10  # white JPEG background -> ~0
    assert (ds.polarity == -1).all()


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("karyo")
    return generate_karyotypes(out / "syn", cases=20, seed=0, abnormal_rate=0.2, flip_rate=0.5, workers=1)


def test_schedule_has_the_four_steps():
    cfg = load_config(KaryotypeConfig, TINY, ["model.variant=varifocal", "train.lnet_rounds=2"])
    names = [p.name for p in schedule(cfg)]
    assert names == ["gnet", "localizer", "lnet_1", "locrefine_1", "lnet_2", "locrefine_2", "fusion"]
    g_only = load_config(KaryotypeConfig, TINY, ["model.variant=g_only"])
    assert [p.name for p in schedule(g_only)] == ["gnet"]
    # the reported head: the design's last trained head, or model.output_head when the schedule trains it
    assert final_head(cfg) == "fusion" and final_head(g_only) == "g"
    vf = ["model.variant=varifocal"]
    assert final_head(load_config(KaryotypeConfig, TINY, [*vf, "train.fusion_epochs=0"])) == "l"
    assert final_head(load_config(KaryotypeConfig, TINY, [*vf, "model.output_head=mean"])) == "mean"
    with pytest.raises(ConfigError, match="output_head=mean"):
        final_head(load_config(KaryotypeConfig, TINY, ["model.variant=g_only", "model.output_head=mean"]))


@pytest.mark.slow
def test_train_predict_karyogram_end_to_end(synthetic, tmp_path):
    torch.set_num_threads(1)
    run, pred = tmp_path / "run", tmp_path / "pred"
    rc = cli_main(["karyotype", "train", "--config", TINY, "--data", str(synthetic), "--out", str(run),
                   "train.gnet_epochs=10", "train.lr_step_epochs=7"])
    assert rc == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    # 24 types: chance is ~4 %; about 35 s of CPU training on 16 cells reaches ~75 % or more
    assert metrics["type_accuracy"] > 0.5
    assert metrics["polarity_accuracy"] > 0.85
    assert metrics["case_accuracy_optimal"] >= metrics["case_accuracy_none"]
    assert (run / "eval" / "confusion.png").stat().st_size > 1000
    assert (run / "checkpoints" / "gnet.pt").is_file()
    state = torch.load(run / "checkpoints" / "gnet.pt", weights_only=True)
    assert state["done"] and state["epochs_done"] == 10

    # resume of a finished run does no training and gives the same model
    assert cli_main(["karyotype", "train", "--config", TINY, "--data", str(synthetic), "--out", str(run),
                     "--resume", "train.gnet_epochs=10", "train.lr_step_epochs=7"]) == 0
    again = json.loads((run / "eval" / "metrics.json").read_text())
    assert again["type_accuracy"] == metrics["type_accuracy"]
    # resuming with another config is refused, naming the changed key
    assert cli_main(["karyotype", "train", "--config", TINY, "--data", str(synthetic), "--out", str(run),
                     "--resume", "train.gnet_epochs=11", "train.lr_step_epochs=7"]) == 2
    # a non-empty run folder is refused without --resume / --overwrite
    train_again = ["karyotype", "train", "--config", TINY, "--data", str(synthetic), "--out", str(run)]
    assert cli_main(train_again) == 2

    predict = ["karyotype", "predict", "--model", str(run), "--data", str(synthetic), "--out", str(pred)]
    assert cli_main(predict) == 0
    frame = pd.read_csv(pred / "predictions.csv", dtype={"case_id": str})
    for col in ("path", "case_id", "pred_class_1to24", "pred_polarity", "p_top", "dispatched_class_1to24"):
        assert col in frame.columns
    assert frame["dispatched_class_1to24"].between(1, 24).all()
    truth = pd.read_csv(synthetic, dtype={"case_id": str})
    assert len(frame) == len(truth)
    cases = sorted(truth["case_id"].unique())
    case_files = sorted(p.stem for p in (pred / "cases").glob("*.json"))
    assert case_files == cases
    record = json.loads((pred / "cases" / f"{cases[0]}.json").read_text())
    assert set(record) >= {"counts", "sex", "sex_confidence", "warnings", "changed"}
    assert sum(record["counts"].values()) == record["chromosomes"]

    # `holons karyotype evaluate` evaluates the saved model on the run's test rows again: without
    # mirror averaging it reproduces the run's own numbers exactly
    rows = karyotype_api.evaluate(run, synthetic, heads=["g"], device="cpu")
    assert [r["test_time_hflip"] for r in rows] == [False, True]
    assert rows[0]["type_accuracy"] == metrics["type_accuracy"]
    assert rows[0]["case_accuracy_optimal"] == metrics["case_accuracy_optimal"]
    assert (run / "reeval" / "results.json").is_file()
    assert cli_main(["karyotype", "evaluate", "--run", str(run), "--data", str(synthetic), "--heads", "g",
                     "--device", "cpu"]) == 0
    assert json.loads((run / "reeval" / "results.json").read_text())["rows"] == rows
    with pytest.raises(HolonsError, match="not in this model"):
        karyotype_api.evaluate(run, synthetic, heads=["l"], device="cpu")

    png = tmp_path / "k.png"
    assert cli_main(["karyotype", "karyogram", "--predictions", str(pred), "--case", cases[0],
                     "--out", str(png)]) == 0
    assert png.stat().st_size > 5000
    assert cli_main(["karyotype", "karyogram", "--predictions", str(pred), "--case", "nope",
                     "--out", str(png)]) == 2


def test_varifocal_schedule_runs_and_resumes(synthetic, tmp_path):
    """One epoch of each step of the full schedule on a handful of cells, then a resume."""
    torch.set_num_threads(1)
    over = ["model.variant=varifocal", "data.input_size=32", "data.max_train_cases=4", "train.gnet_epochs=1",
            "train.lnet_epochs=1", "train.fusion_epochs=1", "train.cutmix_prob=0.5"]
    from holons.finetune.karyotype.model_folder import load_model
    from holons.finetune.karyotype.train import train_karyotype

    cfg = load_config(KaryotypeConfig, TINY, over)
    summary = train_karyotype(cfg, synthetic, tmp_path / "vf")
    assert summary["head"] == "fusion" and summary["test_chromosomes"] > 0
    phases = [json.loads(line)["phase"] for line in (tmp_path / "vf" / "metrics.jsonl").open()]
    assert phases == ["gnet", "localizer", "lnet_1", "locrefine_1", "fusion"]
    # a refinement that lowered the L-Net's validation accuracy was undone: localizer as after lnet_1
    records = [json.loads(line) for line in (tmp_path / "vf" / "metrics.jsonl").open()]
    refine = records[3]
    before = torch.load(tmp_path / "vf" / "checkpoints" / "lnet_1.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "vf" / "checkpoints" / "locrefine_1.pt", weights_only=True)["model"]
    same = all(torch.equal(before[k], after[k]) for k in before if k.startswith("localizer."))
    assert same == ("reverted_to_val_type_acc" in refine)
    model, meta = load_model(tmp_path / "vf")
    assert meta["canvas"] % 8 == 0 and meta["head"] == "fusion"
    # interrupt simulation: drop the last step's checkpoint as if it never finished; resume redoes it only
    (tmp_path / "vf" / "checkpoints" / "fusion.pt").unlink()
    train_karyotype(cfg, synthetic, tmp_path / "vf", resume=True)
    phases = [json.loads(line)["phase"] for line in (tmp_path / "vf" / "metrics.jsonl").open()]
    assert phases == ["gnet", "localizer", "lnet_1", "locrefine_1", "fusion", "fusion"]


def test_a_run_folder_left_before_the_first_checkpoint_is_reused(synthetic, tmp_path):
    """A run that fails before its first checkpoint (here: a wrong manifest) leaves train.log and
    config.yaml; the corrected command is not refused, and its checkpoints carry the provenance."""
    torch.set_num_threads(1)
    from holons.finetune.karyotype.train import train_karyotype

    cfg = load_config(KaryotypeConfig, TINY, ["data.input_size=32", "data.max_train_cases=4",
                                              "train.gnet_epochs=1"])
    run = tmp_path / "run"
    with pytest.raises(HolonsError):
        train_karyotype(cfg, tmp_path / "no_such_manifest.csv", run)
    assert (run / "train.log").is_file() and (run / "config.yaml").is_file()
    (run / "train.log").write_text("the failed run's line\n")
    with pytest.raises(HolonsError, match="nothing to resume"):
        train_karyotype(cfg, synthetic, run, resume=True)
    summary = train_karyotype(cfg, synthetic, run)
    assert summary["test_chromosomes"] > 0
    log_text = (run / "train.log").read_text()
    assert "had no checkpoint" in log_text and "the failed run's line" not in log_text
    state = torch.load(run / "checkpoints" / "gnet.pt", weights_only=True)
    assert state["done"] and {"torch", "timm", "holons", "python"} <= set(state["versions"])
    assert "git_commit" in state
    assert "versions" in json.loads((run / "model" / "karyotype.json").read_text())
    with pytest.raises(HolonsError, match="not empty .* --resume .* --overwrite"):
        train_karyotype(cfg, synthetic, run)


def test_karyogram_slots(tmp_path):
    chromosomes = [(np.ones((20 + k, 6)) * 0.5, k, k % 2)
                   for k in range(1, 25) for _ in range(2 if k < 23 else 1)]
    slots = draw_karyogram(chromosomes, tmp_path / "k.png", warnings=["trisomy 21 (3 copies)"], title="t")
    assert [[slots[n] for n in ([str(k) for k in range(1, 4)])]] == [[(0, 0), (0, 1), (0, 2)]]
    assert slots["X"] == (2, 7) and slots["Y"] == (5, 2)
    assert len(slots) == 24 and [len(r) for r in KARYOGRAM_ROWS] == [3, 2, 8, 6, 2, 3]
    assert (tmp_path / "k.png").stat().st_size > 2000


def test_chromosome_cutmix_mixes_labels_by_foreground():
    from holons.finetune.karyotype.losses import chromosome_cutmix

    images = torch.zeros(8, 1, 32, 32)
    images[:, :, 4:28, 14:18] = 1.0  # thin chromosomes on a blank canvas: area and foreground differ
    labels, polarity = torch.arange(8), torch.tensor([1, 0, 1, 0, 1, 0, 1, -1])
    gen = torch.Generator().manual_seed(0)
    mixed, type_t, pol_t, pol_w = chromosome_cutmix(images, labels, polarity, gen, prob=1.0, alpha=1.0)
    assert torch.allclose(type_t.sum(1), torch.ones(8)) and (type_t >= 0).all()
    assert torch.allclose(pol_t.sum(1), torch.ones(8))
    own = type_t[torch.arange(8), labels]
    # every image's own weight is the share of the mixed foreground not covered by the pasted box
    from holons.anatomy.mixing import box_masks, cutmix

    ref = cutmix(images, generator=torch.Generator().manual_seed(0), prob=1.0, alpha=1.0)
    fg = images[:, 0] > 0.1
    paste = box_masks(ref.boxes, (32, 32))[:, 0]
    a = (fg & ~paste).flatten(1).sum(1).float()
    b = (fg[ref.partner] & paste).flatten(1).sum(1).float()
    expected = torch.where(a + b > 0, a / (a + b).clamp_min(1), ref.lam)
    assert torch.allclose(own, expected, atol=1e-6)
    assert pol_w[7] == 0 and pol_w[ref.partner == 7].eq(0).all()
    # probability 0 is the identity
    same, t0, _, _ = chromosome_cutmix(images, labels, polarity, gen, prob=0.0, alpha=1.0)
    assert torch.equal(same, images) and torch.equal(t0.argmax(1), labels)


class _Images:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)


class _LeftRightNet(torch.nn.Module):
    """Type logit 0 is the left half's mean intensity, 1 the right half's; polarity the same."""

    def predict_logits(self, x, head):
        w = x.shape[-1] // 2
        logits = torch.stack([x[..., :w].mean(dim=(1, 2, 3)), x[..., w:].mean(dim=(1, 2, 3))], dim=1) * 10
        return torch.cat([logits, torch.full((len(x), 22), -50.0)], dim=1), logits


def test_test_time_hflip_averages_the_mirror_image():
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :, :4] = 255  # bright left half
    data = _Images(images)
    plain, _ = predict_dataset(_LeftRightNet(), data, "g", torch.device("cpu"))
    both, pol = predict_dataset(_LeftRightNet(), data, "g", torch.device("cpu"), hflip=True)
    assert plain[0, 0] > 0.99  # the left half wins
    mirrored = torch.tensor([10.0, 0.0]).flip(0)
    expected = (torch.tensor([10.0, 0.0]).softmax(0) + mirrored.softmax(0)) / 2
    assert torch.allclose(pol[0], expected, atol=1e-6) and torch.allclose(both[:, :2].sum(1), torch.ones(3))
    assert torch.allclose(both[0, :2], torch.tensor([0.5, 0.5]), atol=1e-6)


class _TopBottomNet(torch.nn.Module):
    """Polarity 1 (upright) when the top half is brighter; type 0 / 1 likewise top / bottom."""

    def predict_logits(self, x, head):
        h = x.shape[-2] // 2
        top, bottom = x[..., :h, :].mean(dim=(1, 2, 3)), x[..., h:, :].mean(dim=(1, 2, 3))
        return (torch.cat([torch.stack([top, bottom], 1) * 10, torch.full((len(x), 22), -50.0)], dim=1),
                torch.stack([bottom, top], 1) * 10)


def test_test_time_vflip_swaps_the_upside_down_polarity_back():
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :4] = 255  # bright top half: upright
    data = _Images(images)
    types, pol = predict_dataset(_TopBottomNet(), data, "g", torch.device("cpu"), vflip=True)
    assert bool((pol[:, 1] > 0.99).all())  # the upside-down view votes "upright" once swapped back
    assert torch.allclose(types[:, :2], torch.full((2, 2), 0.5), atol=1e-4)  # its type vote is averaged in
    four, pol4 = predict_dataset(_TopBottomNet(), data, "g", torch.device("cpu"), hflip=True, vflip=True)
    assert torch.allclose(four, types, atol=1e-6) and torch.allclose(pol4, pol, atol=1e-6)
