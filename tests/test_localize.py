"""Weakly supervised localizers on tiny phantoms: every method trains, writes a model folder and predicts
maps in the source geometry with boxes; the PDiscoNet priors, the SGMA losses and crops, the PPL stage
schedule and the weak-label sets each checked on cases whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from holons.cli import localize as localize_cli
from holons.cli import main
from holons.data.chromosome_attributes import CHROMOSOME_TYPES, chromosome_attribute_matrix
from holons.data.synthetic.radiographs import generate_radiographs
from holons.data.weak_labels import load_weak_label_set
from holons.errors import ConfigError, HolonsError
from holons.finetune.localize import METHODS, build_localizer
from holons.finetune.localize import train as train_module
from holons.finetune.localize.folder import load_localizer
from holons.finetune.localize.pdisconet import (
    concentration_loss,
    equivariance_loss,
    orthogonality_loss,
    presence_loss,
    random_rigid_thetas,
    rigid_transform,
)
from holons.finetune.localize.ppl import PPLLocalizer, ppl_granularity
from holons.finetune.localize.predict import box_from_map, predict_maps
from holons.finetune.localize.sgma import centre_triplet_loss, crop_boxes
from holons.finetune.localize.train import train_localizer
from holons.ssl.backbone import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"arch": "test_resnet", "image_size": 32, "feature_stage": -3, "steps": 2, "batch_size": 4,
        "checkpoint_every": 1}
OPTIONS = {"genpromp": {"denoise_size": 16, "width": 16, "prompt_dim": 16, "map_timesteps": [100, 400]},
           "sgma": {"part_size": 16}}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_radiographs(root, n=18, seed=3, size=40, images_per_patient=1, findings_rate=0.6,
                         formats=("png",), workers=1, progress=False)
    return root


def _tiny(method: str, **extra) -> dict:
    return {**TINY, "method": method, "options": OPTIONS.get(method, {}), **extra}


# ---------------------------------------------------------------- every method, end to end

@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_writes_a_folder_and_maps_in_source_geometry(method, phantoms, tmp_path):
    run = train_localizer(_tiny(method), data=phantoms, out=tmp_path / "run")
    meta = json.loads((run.out / "config.json").read_text())
    assert meta["method"] == method and meta["classes"] == ["absent", "present"]
    assert meta["preprocessing"] == {"size": 32, "resize": "letterbox", "voi": "window", "intensity": "voi"}
    assert (run.out / "model.safetensors").is_file() and "test_accuracy" in run.metrics
    assert not (run.out / "checkpoints").exists()

    dataset = load_weak_label_set(phantoms)
    wide = np.random.default_rng(0).random((30, 50)).astype(np.float32)  # a non-square source
    prediction = predict_maps(run.out, [dataset.paths[0], wide])
    assert [m.shape for m in prediction.maps] == [(40, 40), (30, 50)]
    assert all(0 <= m.min() and m.max() <= 1 for m in prediction.maps)
    assert prediction.boxes.shape == (2, 4) and prediction.probabilities.shape == (2, 2)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1, atol=1e-5)
    x0, y0, x1, y1 = prediction.boxes[1]
    assert -0.5 <= x0 < x1 <= 49.5 and -0.5 <= y0 < y1 <= 29.5

    # the folder alone rebuilds the same module: same maps as the trained one
    loaded = load_localizer(run.out)
    canvas = torch.from_numpy(loaded.preprocessing.apply(wide)[0])[None, None]
    again = loaded.module.localization_map(canvas, torch.tensor([1]))
    assert again.shape == (1, 32, 32)
    assert torch.equal(again, loaded.module.localization_map(canvas, torch.tensor([1])))


def test_resume_continues_where_an_interrupted_run_stopped(phantoms, tmp_path, monkeypatch):
    config = _tiny("pdisconet", steps=4, checkpoint_every=2)
    whole = train_localizer(config, data=phantoms, out=tmp_path / "whole")
    real_batch = train_module._batch

    def fail_at_three(labels, size, seed, step, balanced):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(labels, size, seed, step, balanced)

    monkeypatch.setattr(train_module, "_batch", fail_at_three)
    with pytest.raises(KeyboardInterrupt):
        train_localizer(config, data=phantoms, out=tmp_path / "cut")
    assert (tmp_path / "cut" / "checkpoints").is_dir()
    monkeypatch.setattr(train_module, "_batch", real_batch)
    with pytest.raises(HolonsError, match="not empty"):
        train_localizer(config, data=phantoms, out=tmp_path / "cut")
    resumed = train_localizer(config, data=phantoms, out=tmp_path / "cut", resume=True)
    a, b = load_localizer(whole.out).module.state_dict(), load_localizer(resumed.out).module.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # a finished folder resumes to itself
    again = train_localizer(config, data=phantoms, out=tmp_path / "cut", resume=True)
    assert again.metrics == resumed.metrics


def test_training_starts_from_an_exported_foundation(phantoms, tmp_path):
    from holons.data.preprocess import Preprocessing
    from holons.ssl.export import save_foundation, timm_config

    torch.manual_seed(5)
    backbone = create_backbone("test_resnet")
    config = timm_config("test_resnet", backbone.embed_dim, in_chans=1, input_size=32, mean=0.4, std=0.2,
                         preprocessing=Preprocessing(size=32, voi="minmax"))
    foundation = save_foundation(backbone.model, tmp_path / "export", config)
    run = train_localizer(_tiny("cam", init=str(foundation), lr=0.0), data=phantoms, out=tmp_path / "run")
    meta = json.loads((run.out / "config.json").read_text())
    assert meta["architecture"] == "test_resnet" and meta["input_stats"] == pytest.approx([0.4, 0.2])
    assert meta["preprocessing"]["voi"] == "minmax"  # read like the foundation's images
    trained = dict(load_localizer(run.out).module.backbone.named_parameters())
    assert all(torch.equal(v, trained[k]) for k, v in backbone.named_parameters())  # lr 0: kept
    with pytest.raises(HolonsError, match="steps"):
        train_localizer(_tiny("cam", steps=0), data=phantoms, out=tmp_path / "none")


def test_bad_method_options_and_init_are_user_errors(phantoms, tmp_path):
    backbone = create_backbone("test_resnet")
    with pytest.raises(ConfigError, match="unknown localization method"):
        build_localizer("grad-cam", backbone, 2)
    with pytest.raises(ConfigError, match="ppl"):
        build_localizer("ppl", backbone, 2, options={"granularity": 3})
    with pytest.raises(ConfigError, match="feature_stage"):
        build_localizer("cam", backbone, 2, feature_stage=-9)
    with pytest.raises(HolonsError, match="neither"):
        train_localizer(_tiny("cam", init="no/such/folder"), data=phantoms, out=tmp_path / "x")


# ---------------------------------------------------------------- PPL

def test_ppl_stages_grow_the_granularity_over_training():
    assert [ppl_granularity(p, (1, 2, 4)) for p in (0.0, 0.3, 0.34, 0.66, 0.67, 0.99)] == [1, 1, 2, 2, 4, 4]
    assert ppl_granularity(1.0, (1, 2, 4)) == 4 and ppl_granularity(0.5, (3,)) == 3


def test_ppl_patches_are_classified_at_the_stage_granularity_and_fusion_uses_all():
    torch.manual_seed(0)
    model = PPLLocalizer(create_backbone("test_resnet"), 3, feature_stage=-3, granularities=(1, 2, 4))
    feats = torch.randn(2, model.channels, 8, 8)
    assert model.patch_logits(feats, 4).shape == (2, 3, 4, 4)
    assert model._granularities(0.1) == [1] and model._granularities(0.9) == [4]
    assert model._granularities(None) == [4]  # inference: the final stage
    model.fusion = True
    assert model._granularities(0.1) == [1, 2, 4]
    # the shared head is not linear: the mean of 2x2 patch logits is not the global (1x1) logit
    halves = model.patch_logits(feats, 2).mean(dim=(2, 3))
    assert not torch.allclose(halves, model.patch_logits(feats, 1)[..., 0, 0])


# ---------------------------------------------------------------- PDiscoNet priors

def test_concentration_is_lower_for_a_concentrated_map_than_a_spread_one():
    point = torch.zeros(1, 1, 16, 16)
    point[0, 0, 5, 9] = 1.0
    blob = torch.zeros(1, 1, 16, 16)
    blob[0, 0, 4:8, 8:12] = 1.0
    uniform = torch.ones(1, 1, 16, 16)
    values = [concentration_loss(m).item() for m in (point, blob, uniform)]
    assert values[0] == pytest.approx(0.0, abs=1e-7)
    assert values[0] < values[1] < values[2]
    assert values[2] == pytest.approx(2 * (1 - 1 / 256) / 12, rel=1e-5)  # variance of a uniform grid


def test_orthogonality_is_zero_for_orthogonal_parts_and_one_for_identical_ones():
    eye = torch.eye(3)[None]
    assert orthogonality_loss(eye).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(1, 3, 5)
    assert orthogonality_loss(same).item() == pytest.approx(1.0, rel=1e-6)


def test_equivariance_loss_is_zero_for_an_equivariant_map_and_not_for_a_fixed_one():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 24, 24)
    theta = random_rigid_thetas(3, max_degrees=30, generator=torch.Generator().manual_seed(1))
    pointwise = equivariance_loss(lambda x: torch.cat([2 * x + 1, -x], dim=1), images, theta)
    assert pointwise.item() == pytest.approx(0.0, abs=1e-5)
    ramp = torch.linspace(0, 1, 24).expand(24, 24)
    fixed = equivariance_loss(lambda x: ramp.expand(len(x), 1, 24, 24), images, theta)
    assert fixed.item() > 0.05


def test_rigid_thetas_are_rotations_flips_and_scales():
    theta = random_rigid_thetas(64, scale_range=(0.9, 1.1), generator=torch.Generator().manual_seed(0))
    det = torch.det(theta[:, :, :2])
    assert torch.all((det.abs() > 1 / 1.1 ** 2 - 1e-5) & (det.abs() < 1 / 0.9 ** 2 + 1e-5))
    assert (det < 0).any() and (det > 0).any()  # some flipped, some not
    no_flip = random_rigid_thetas(32, flip=False, generator=torch.Generator().manual_seed(0))
    assert (torch.det(no_flip[:, :, :2]) > 0).all()
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    x = torch.rand(1, 2, 8, 8)
    assert torch.allclose(rigid_transform(x, identity), x, atol=1e-6)


def test_presence_is_lower_when_every_part_shows_up_and_the_background_holds_the_border():
    b, k, n = 2, 2, 8
    present = torch.zeros(b, k + 1, n, n)
    present[:, -1] = 1.0                 # background everywhere ...
    present[0, 0, 2:5, 2:5] = 1.0        # ... but part 0 in image 0
    present[1, 1, 3:6, 3:6] = 1.0        # and part 1 in image 1
    present[0, -1, 2:5, 2:5] = 0.0
    present[1, -1, 3:6, 3:6] = 0.0
    uniform = torch.full((b, k + 1, n, n), 1 / (k + 1))
    assert presence_loss(present).item() == pytest.approx(0.0, abs=1e-6)
    assert presence_loss(uniform).item() > 1.0


# ---------------------------------------------------------------- SGMA

def test_centre_triplet_loss_is_zero_at_the_own_centre_and_positive_when_swapped():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    assert centre_triplet_loss(centres.clone(), labels, centres, margin=0.5).item() == 0.0
    assert centre_triplet_loss(centres.flip(0), labels, centres, margin=0.5).item() == pytest.approx(2.5)


def test_crop_centres_follow_the_attention():
    attention = torch.zeros(1, 2, 4, 4)
    attention[0, 0, 0, 3] = 1.0                       # top right cell
    attention[0, 1, 2:4, 0] = 0.5                     # two cells on the left, lower half
    soft, peak = crop_boxes(attention, "soft"), crop_boxes(attention, "peak")
    assert soft[0, 0].tolist() == pytest.approx([0.75, -0.75])
    assert soft[0, 1].tolist() == pytest.approx([-0.75, 0.5])
    assert peak[0, 0].tolist() == pytest.approx([0.75, -0.75])


def test_sgma_attribute_embedding_takes_the_iscn_table():
    backbone = create_backbone("test_resnet")
    model = build_localizer("sgma", backbone, 24, feature_stage=-3,
                            options={"attributes": "iscn", "part_size": 16})
    images = torch.rand(2, 1, 32, 32)
    loss, terms = model.loss(images, torch.tensor([0, 23]), progress=0.0)
    assert math.isfinite(loss.item()) and set(terms) == {"ce", "global_ce", "triplet", "diversity"}
    assert model.logits(images).shape == (2, 24)
    with pytest.raises(ConfigError, match="rows"):
        build_localizer("sgma", backbone, 5, options={"attributes": "iscn"})


def test_iscn_table_has_every_type_and_sensible_order():
    table = chromosome_attribute_matrix()
    assert table.shape == (24, 2) and len(CHROMOSOME_TYPES) == 24
    np.testing.assert_allclose(table.mean(axis=0), 0, atol=1e-6)
    length = table[:, 0]
    assert length[0] == length.max() and length[CHROMOSOME_TYPES.index("21")] == length.min()
    acrocentric = [CHROMOSOME_TYPES.index(t) for t in ("13", "14", "15", "21", "22")]
    metacentric = [CHROMOSOME_TYPES.index(t) for t in ("1", "3", "19", "20")]
    assert table[acrocentric, 1].max() < table[metacentric, 1].min()


# ---------------------------------------------------------------- GenPromp

def test_genpromp_maps_come_from_cross_attention_and_are_deterministic():
    torch.manual_seed(0)
    model = build_localizer("genpromp", create_backbone("test_resnet"), 2, feature_stage=-3,
                            options=OPTIONS["genpromp"]).eval()
    images = torch.rand(2, 1, 32, 32)
    raw = model.class_maps(images, torch.tensor([0, 1]))
    assert raw.shape == (2, 16, 16) and torch.all((raw >= 0) & (raw <= 1))
    assert torch.equal(raw, model.class_maps(images, torch.tensor([0, 1])))
    assert all(layer.probs is None and not layer.record for layer in model.denoiser.attention_layers())
    other = model.class_maps(images, torch.tensor([1, 0]))
    assert not torch.allclose(raw, other)  # the class token changes where the denoiser looks


# ---------------------------------------------------------------- boxes and data

def test_box_from_map_takes_the_largest_region_above_the_fraction():
    m = np.zeros((10, 12))
    m[1:3, 1:3] = 1.0          # small, brightest
    m[5:9, 4:10] = 0.8         # large
    assert box_from_map(m, 0.5).tolist() == [3.5, 4.5, 9.5, 8.5]
    assert box_from_map(m, 0.9).tolist() == [0.5, 0.5, 2.5, 2.5]
    assert np.isnan(box_from_map(np.zeros((4, 4)))).all()


def test_weak_label_sets_phantoms_and_manifest(phantoms, tmp_path):
    table = pd.read_csv(phantoms / "image_table.csv")
    nodules = load_weak_label_set(phantoms)
    assert nodules.classes == ["absent", "present"] and len(nodules.paths) == len(table)
    i = int(np.flatnonzero(table["nodule"] == 1)[0])
    r = table.loc[i, "nodule_size"] / 2
    assert nodules.boxes[i].tolist() == [[table.loc[i, "nodule_x"] - r, table.loc[i, "nodule_y"] - r,
                                          table.loc[i, "nodule_x"] + r, table.loc[i, "nodule_y"] + r]]
    assert all(len(b) == 0 for b, y in zip(nodules.boxes, nodules.labels, strict=True) if not y)
    hearts = load_weak_label_set(phantoms, "cardiomegaly")
    j = int(np.flatnonzero(hearts.labels)[0])
    with Image.open(phantoms / "masks" / "heart" / f"{table.loc[j, 'id']}.png") as im:
        ys, xs = np.nonzero(np.asarray(im) > 127)
    assert hearts.boxes[j].tolist() == [[xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5]]
    with pytest.raises(HolonsError, match="findings"):
        load_weak_label_set(phantoms, "effusion")

    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png", "a.png", "b.png"], "label": ["cat", "cat", "dog"],
                  "split": ["train", "train", "test"], "x0": [1, 5, None], "y0": [1, 5, None],
                  "x1": [3, 7, None], "y1": [3, 7, None]}).to_csv(manifest, index=False)
    m = load_weak_label_set(manifest)
    assert m.classes == ["cat", "dog"] and m.labels.tolist() == [0, 1] and m.held_out_split() == "test"
    assert m.boxes[0].tolist() == [[1, 1, 3, 3], [5, 5, 7, 7]] and m.boxes[1].shape == (0, 4)
    assert m.paths[0] == tmp_path / "a.png"


def test_jsrt_nodules_have_boxes_in_the_1024_frame(shared_data):
    root = shared_data / "radiographs" / "jsrt_scr"
    if not (root / "image_table.csv").is_file():
        pytest.skip("JSRT not in the shared data")
    jsrt = load_weak_label_set(root)
    assert jsrt.held_out_split() == "val" and set(jsrt.split) == {"train", "val"}
    positives = np.flatnonzero(jsrt.labels)
    assert len(positives) > 0 and all(len(jsrt.boxes[i]) == 1 for i in positives)
    box = jsrt.boxes[positives[0]][0]
    assert 0 <= box[0] < box[2] <= 1024 and box[2] - box[0] > 5
    assert all(p.is_file() for p in jsrt.paths[:3])


# ---------------------------------------------------------------- CLI

def test_cli_method_names_match_the_registry():
    assert tuple(localize_cli.METHODS) == tuple(METHODS)


def test_cli_trains_predicts_and_evaluates(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["finetune", "localize", "--method", "cam", "--data", str(phantoms), "--out", str(run),
            *[f"{k}={v}" for k, v in TINY.items()]]
    assert main(args) == 0
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    image = load_weak_label_set(phantoms).paths[0]
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p")]) == 0
    boxes = pd.read_csv(tmp_path / "p" / "boxes.csv")
    assert list(boxes.columns[:2]) == ["image", "map_class"] and len(boxes) == 1
    with Image.open(tmp_path / "p" / "maps" / f"{image.stem}.png") as im:
        assert im.size == (40, 40)
    folder = tmp_path / "mixed"  # a folder with an unreadable file: reported, skipped, the rest predicted
    folder.mkdir()
    (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "q")]) == 0
    assert len(pd.read_csv(tmp_path / "q" / "boxes.csv")) == 1
    assert "broken.png" in capsys.readouterr().err
    assert main(["evaluate", "localize", "--model", str(run), "--data", str(phantoms),
                 "--out", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "results.json").read_text())
    assert summary["method"] == "cam" and 0 <= summary["max_box_acc_v2"] <= 1
