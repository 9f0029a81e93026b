"""Evaluation protocols: metrics against hand-computed cases, correspondence on a known shift,
kNN on separable embeddings, few-shot segmentation and the CLI end to end on tiny phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from holons.cli import main
from holons.data.annotated import STRUCTURES, landmarks_to_canvas, landmarks_to_source, load_annotated
from holons.data.labelled import label_subset, load_classification_set
from holons.data.preprocess import Preprocessing
from holons.errors import ConfigError
from holons.eval.classify import knn_scores, linear_probe_scores
from holons.eval.correspondence import match_points, part_whole_cosines, sample_pairs
from holons.eval.features import load_backbone
from holons.eval.fewshot_seg import evaluate_fewshot_segmentation, format_fewshot
from holons.finetune import metrics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """12 tiny phantoms (4 patients x 3 acquisitions) with masks and landmarks."""
    from holons.data.synthetic.radiographs import generate_radiographs

    out = tmp_path_factory.mktemp("phantoms")
    generate_radiographs(out, n=12, seed=3, size=64, formats=("png",), workers=1, progress=False)
    return out


# --------------------------------------------------------------------------- metrics
def test_dice_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, ~a) == 0.0
    assert metrics.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError):
        metrics.dice(a, np.zeros((3, 3)))


def test_landmark_error_and_pck():
    gt = np.array([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0], [1.0, 1.0]])
    pred = gt + np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 30.0]])
    err = metrics.landmark_errors(pred, gt)
    np.testing.assert_allclose(err, [5.0, 0.0, 10.0, 30.0])
    assert metrics.pck(err, [5, 10, 20]) == {"pck@5": 50.0, "pck@10": 75.0, "pck@20": 75.0}
    s = metrics.error_summary(err, [10])
    assert s["mean_px"] == pytest.approx(11.25) and s["median_px"] == pytest.approx(7.5)
    assert s["n_points"] == 4


def test_auc_matches_sklearn_and_bootstrap_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = y * 0.8 + rng.normal(0, 0.6, 80)
    assert metrics.auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert metrics.auc(y, np.stack([1 - s, s], 1)) == pytest.approx(roc_auc_score(y, s))
    r1 = metrics.auc_with_ci(y, s, n_boot=300, seed=5)
    r2 = metrics.auc_with_ci(y, s, n_boot=300, seed=5)
    r3 = metrics.auc_with_ci(y, s, n_boot=300, seed=6)
    assert r1 == r2 and r1 != r3
    assert r1["auc_lo"] < r1["auc"] < r1["auc_hi"]
    one_class = metrics.auc_with_ci(np.ones(5), np.arange(5.0), n_boot=10)
    assert np.isnan(one_class["auc"])


def test_multiclass_auc_and_f1():
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.7 + 0.1
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    pred = p.argmax(1)
    assert metrics.accuracy(y, pred) == pytest.approx(5 / 6)
    # class F1: 0 -> 1.0, 1 -> 2*2/(3+2)=0.8, 2 -> 2*1/(1+2)=0.667
    assert metrics.macro_f1(y, pred) == pytest.approx((1 + 0.8 + 2 / 3) / 3)


# --------------------------------------------------------------------------- correspondence
def test_match_points_recovers_a_known_shift():
    """Features = 5x5 patches of a random texture: every location is unique, so cosine argmax finds
    the shifted copy of each point exactly."""
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.random((48, 48)).astype(np.float32))
    dy, dx = 3, -5
    shifted = torch.roll(img, shifts=(dy, dx), dims=(0, 1))

    def patches(x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x[None, None], 5, padding=2).reshape(25, 48, 48)

    pts = np.array([[10.0, 12.0], [30.0, 20.0], [24.0, 36.0], [15.0, 15.0]])
    pred = match_points(patches(img), pts, patches(shifted))
    np.testing.assert_array_equal(pred, pts + [dx, dy])
    err = metrics.landmark_errors(pred, pts + [dx, dy])
    assert metrics.pck(err, [1])["pck@1"] == 100.0


def _twin_set(phantoms, out, shift: tuple[int, int] = (0, 0)):
    """A two-image set (different patients, test split): phantom 0 and a copy of it whose content
    and landmarks are moved by ``shift`` = (dx, dy) pixels (edge pixels repeated)."""
    import shutil

    from PIL import Image

    from holons.data.annotated import LANDMARK_KEYS

    src = load_annotated(phantoms)
    image_id = src.ids()[0]
    dx, dy = shift
    img = np.asarray(Image.open(src.image_path(image_id)))
    moved = np.pad(img, ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))), mode="edge")
    moved = moved[max(-dy, 0):max(-dy, 0) + img.shape[0], max(-dx, 0):max(-dx, 0) + img.shape[1]]
    (out / "images").mkdir(parents=True)
    shutil.copy(src.image_path(image_id), out / "images" / "a.png")
    Image.fromarray(moved).save(out / "images" / "b.png")
    for s, pts in src.landmarks(image_id).items():
        (out / "landmarks" / LANDMARK_KEYS[s]).mkdir(parents=True)
        np.save(out / "landmarks" / LANDMARK_KEYS[s] / "a.npy", pts)
        np.save(out / "landmarks" / LANDMARK_KEYS[s] / "b.npy", pts + [dx, dy])
    (out / "image_table.csv").write_text("id,split,patient_id\na,test,p1\nb,test,p2\n")
    return load_annotated(out)


def test_correspondence_frame_chain_self_match_and_shift(phantoms, tmp_path):
    """End to end through resizing (64 px frame -> 32 px evaluation), dense features, upsampling and
    mapping back: an identical target image gives (almost) zero error, also near the border where
    the upsampled 2 x 2 map is flat (a first-index argmax there was off by up to half a cell, the
    mean error 5.4 px); a copy shifted by 8 px is recovered at full resolution."""
    from holons.eval.correspondence import evaluate_correspondence

    torch.manual_seed(0)
    backbone = load_backbone("random", "resnet10t")
    same = evaluate_correspondence(backbone, _twin_set(phantoms, tmp_path / "same"), size=32, pairs=2,
                                   part_whole=False, stages=2, device="cpu")
    assert same.summary["pairs"] == 2 and same.summary["overall"]["n_points"] == 2 * 166
    assert same.summary["overall"]["median_px"] <= 2.0 and same.summary["overall"]["mean_px"] <= 3.5
    moved = evaluate_correspondence(backbone, _twin_set(phantoms, tmp_path / "moved", shift=(8, 0)),
                                    size=64, pairs=2, part_whole=False, stages=4, device="cpu")
    assert moved.summary["overall"]["median_px"] <= 1.0 and moved.summary["overall"]["mean_px"] <= 3.0


def test_landmarks_round_trip_through_the_canvas_with_pixel_centres():
    geometry = Preprocessing(size=256).geometry(1024, 1024)
    pts = np.array([[0.0, 0.0], [1023.0, 511.5]])
    small = landmarks_to_canvas(pts, geometry)
    np.testing.assert_allclose(small[0], [-0.375, -0.375])
    np.testing.assert_allclose(landmarks_to_source(small, geometry), pts)
    wide = Preprocessing(size=256).geometry(512, 1024)  # letterboxed: 128 rows of content, 64 padded above
    np.testing.assert_allclose(landmarks_to_canvas(np.array([[1023.0, 0.0]]), wide), [[255.375, 63.625]])


def test_sample_pairs_prefers_different_patients():
    pairs = sample_pairs(["a", "b", "c", "d"], ["p", "p", "q", "q"], 100, seed=0)
    assert len(pairs) == 8
    assert all({s, t} not in ({"a", "b"}, {"c", "d"}) for s, t in pairs)
    assert sample_pairs(["a", "b", "c", "d"], ["p", "p", "q", "q"], 3, seed=1) == \
        sample_pairs(["a", "b", "c", "d"], ["p", "p", "q", "q"], 3, seed=1)


def test_part_whole_cosine_of_a_constant_image_is_one():
    backbone = load_backbone("random", "resnet10t")
    x = torch.full((2, 1, 32, 32), 0.3)
    pw = part_whole_cosines(backbone, x, random_wholes=1)
    assert list(pw["whole"]) == ["image", "image", "random", "random"]
    np.testing.assert_allclose(pw["cosine"], 1.0, atol=1e-5)


class _Moments(torch.nn.Module):
    """A stand-in backbone: E(x) = (10, mean x, mean x^2). The mean and mean square of an image with
    constant quadrants are the means over its quadrants' (parts') embeddings: parts compose exactly."""

    embed_dim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full((len(x),), 10.0), x.mean((1, 2, 3)), (x ** 2).mean((1, 2, 3))], 1)


class _Corner(torch.nn.Module):
    """E(x) = (10, top-left pixel): a whole's embedding says nothing of its other parts."""

    embed_dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full((len(x),), 10.0), x[:, 0, 0, 0]], 1)


def _quadrant_images(values: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """8 x 8 images whose quadrants (raster order) are constant."""
    x = torch.zeros(len(values), 1, 8, 8)
    for i, (a, b, c, d) in enumerate(values):
        x[i, 0, :4, :4], x[i, 0, :4, 4:], x[i, 0, 4:, :4], x[i, 0, 4:, 4:] = a, b, c, d
    return x


def test_part_whole_centred_cosine_and_retrieval_when_parts_compose():
    # (mean, mean square) per image: (.1, .01), (.9, .81), (.5, .5), (.5, .25): four directions about
    # their centroid, so each whole's own parts are its best match.
    x = _quadrant_images([(.1,) * 4, (.9,) * 4, (0, 0, 1, 1), (.5,) * 4])
    pw = part_whole_cosines(_Moments(), x)
    np.testing.assert_allclose(pw["cosine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(pw["cosine_centred"], 1.0, atol=1e-5)
    assert pw["retrieved"].all()


def test_part_whole_raw_cosine_saturates_where_centred_and_retrieval_do_not():
    # Every image's parts average to 0.5, whatever its top-left quadrant: the part means are all equal.
    x = _quadrant_images([(.1, .9, .5, .5), (.9, .1, .5, .5), (.3, .7, .5, .5), (.7, .3, .5, .5)])
    pw = part_whole_cosines(_Corner(), x)
    assert (pw["cosine"] > 0.99).all()  # the common component alone
    # centred: the part means sit at (0, 0.5 - centre), centre = (mean top-left + 0.5) / 2 = 0.5
    np.testing.assert_allclose(pw["cosine_centred"], 0.0, atol=1e-6)
    assert pw["retrieved"].sum() <= 1  # ties: no whole finds its own parts better than chance


# --------------------------------------------------------------------------- data and weights
def test_annotated_loader_reads_phantoms(phantoms):
    data = load_annotated(phantoms)
    assert set(data.splits) <= {"train", "val", "test"} and data.default_eval_split() in ("test", "val")
    image_id = data.ids()[0]
    assert data.read(image_id).shape == (64, 64)
    lm = data.landmarks(image_id)
    assert [len(lm[s]) for s in STRUCTURES] == [44, 50, 26, 23, 23]
    masks = data.masks(image_id)
    assert masks.shape == (5, 64, 64) and masks.dtype == bool and masks.any(axis=(1, 2)).all()
    assert data.structures == STRUCTURES


def test_load_backbone_errors(tmp_path):
    with pytest.raises(ConfigError, match="--arch"):
        load_backbone("random")
    with pytest.raises(ConfigError, match="not an exported"):
        load_backbone(tmp_path)


# --------------------------------------------------------------------------- classification
def test_knn_on_separable_embeddings():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 5
    train_y = np.repeat([0, 1, 2], 10)
    train = centres[train_y] + rng.normal(0, 0.3, (30, 8))
    test_y = np.array([0, 1, 2, 2, 1, 0])
    test = centres[test_y] + rng.normal(0, 0.3, (6, 8))
    scores = knn_scores(train, train_y, test, 3, k=20, temperature=0.07)
    np.testing.assert_allclose(scores.sum(1), 1.0)
    assert (scores.argmax(1) == test_y).all()
    lin = linear_probe_scores(train, train_y, test, 3)
    assert (lin.argmax(1) == test_y).all()


def test_label_subset_keeps_every_class():
    labels = np.array([[0, 0]] * 50 + [[1, 0]] * 3 + [[0, 1]] * 2)
    sub = label_subset(labels, 0.01, seed=0)
    assert len(np.unique(labels[sub, 0])) == 2 and len(np.unique(labels[sub, 1])) == 2
    assert len(sub) <= 3
    np.testing.assert_array_equal(label_subset(labels, 0.2, 4), label_subset(labels, 0.2, 4))


def test_covid_set_is_split_by_patient(shared_data):
    root = shared_data / "radiographs" / "covid_chestxray"
    data = load_classification_set(root)
    import pandas as pd

    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    patient_of = dict(zip(meta["filename"], meta["patientid"], strict=True))
    patients = {s: {patient_of[p.name] for p, sp in zip(data.paths, data.split, strict=True) if sp == s}
                for s in ("train", "test")}
    assert patients["train"] and patients["test"] and not patients["train"] & patients["test"]
    assert data.single_label and set(np.unique(data.labels)) == {0, 1}


# --------------------------------------------------------------------------- few-shot segmentation
def test_fewshot_segmentation_end_to_end(phantoms):
    backbone = load_backbone("random", "resnet10t")
    data = load_annotated(phantoms)
    result = evaluate_fewshot_segmentation(backbone, data, shots=(2,), seeds=(0, 1),
                                           modes=("frozen", "finetune"), size=32, steps=3, max_eval=2,
                                           progress=False)
    scores = result.scores
    assert len(scores) == 2 * 2 * 2 * len(STRUCTURES)
    assert scores["dice"].between(0, 1).all()
    d = result.summary["dice"]
    assert set(d) == {"frozen", "finetune"}
    assert set(d["frozen"]["2"]) >= {*STRUCTURES, "lungs", "clavicles", "mean"}
    assert len(d["frozen"]["2"]["heart"]["per_seed"]) == 2
    fit = result.summary["support_dice"]
    assert set(fit) == {"frozen", "finetune"} and set(fit["frozen"]["2"]) == set(d["frozen"]["2"])
    assert "support fit" in format_fewshot(result.summary)


def test_fewshot_support_fit_shows_an_undertrained_decoder(phantoms):
    """The support-set Dice is what tells too few decoder steps apart: it rises with training."""
    backbone = load_backbone("random", "resnet10t")
    data = load_annotated(phantoms)
    fits = [evaluate_fewshot_segmentation(backbone, data, shots=(2,), seeds=(0,), modes=("frozen",), size=32,
                                          steps=steps, max_eval=1, progress=False
                                          ).summary["support_dice"]["frozen"]["2"]["mean"]["mean"]
            for steps in (1, 60)]
    assert 0 <= fits[0] < fits[1] - 0.2 and fits[1] <= 1


# --------------------------------------------------------------------------- CLI
def test_cli_correspondence_writes_results(phantoms, tmp_path, capsys):
    out = tmp_path / "corr"
    rc = main(["evaluate", "correspondence", "--weights", "random", "--arch", "resnet10t",
               "--data", str(phantoms), "--out", str(out), "--size", "64", "--pairs", "3",
               "--radii", "5", "20", "--stages", "2", "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "random" and res["pairs"] == 3 and res["stages"] == 2
    assert set(res["per_structure"]) == set(STRUCTURES)
    assert 0 <= res["overall"]["pck@5"] <= res["overall"]["pck@20"] <= 100
    assert res["overall"]["n_points"] == 3 * 166
    assert (out / "points.csv").is_file() and "image" in res["part_whole"]
    assert "heart" in capsys.readouterr().out
    # random init is seeded (--init-seed, default 0): a rerun evaluates the same model, another seed another
    errors = []
    for i, extra in enumerate(([], ["--init-seed", "1"])):
        again = tmp_path / f"corr{i}"
        assert main(["evaluate", "correspondence", "--weights", "random", "--arch", "resnet10t", "--data",
                     str(phantoms), "--out", str(again), "--size", "64", "--pairs", "3", "--radii", "5", "20",
                     "--stages", "2", "--device", "cpu", *extra]) == 0
        errors.append(json.loads((again / "results.json").read_text())["overall"]["mean_px"])
    assert errors[0] == res["overall"]["mean_px"] != errors[1]


def test_cli_classify_and_bad_weights(phantoms, tmp_path, capsys):
    out = tmp_path / "cls"
    rc = main(["evaluate", "classify", "--weights", "random", "--arch", "resnet10t", "--data", str(phantoms),
               "--out", str(out), "--size", "32", "--protocols", "knn", "linear", "--fractions", "1.0",
               "--n-boot", "20"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"knn", "linear"}
    assert set(res["results"]["knn"]["1"]) == {"cardiomegaly", "nodule"}
    assert (out / "runs.csv").is_file()
    rc = main(["evaluate", "fewshot-seg", "--weights", str(tmp_path), "--data", str(phantoms),
               "--out", str(out)])
    assert rc == 2 and "not an exported foundation folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- real data
def test_jsrt_loader_frames(shared_data):
    data = load_annotated(shared_data / "radiographs" / "jsrt_scr")
    assert data.default_eval_split() == "val" and len(data.ids("val")) > 0
    image_id = data.ids("val")[0]
    assert data.read(image_id).shape == (1024, 1024)
    lm = data.landmarks(image_id)
    assert [len(lm[s]) for s in STRUCTURES] == [44, 50, 26, 23, 23]
    assert all((p >= 0).all() and (p < 1024).all() for p in lm.values())
