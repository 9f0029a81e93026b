"""`holons finetune classify | segment` and `holons predict` on tiny phantoms: model folders, masks in the
source geometry (PNG and NIfTI), probability CSVs, any structure set, the training modes, configs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from holons.cli import main
from holons.config import load_config
from holons.data.annotated import read_mask
from holons.errors import ConfigError, HolonsError
from holons.finetune.backbones import load_backbone
from holons.finetune.classifier import finetune_classify
from holons.finetune.config import ClassifyConfig, SegmentConfig
from holons.finetune.metrics import dice
from holons.finetune.model_folder import load_model
from holons.finetune.prediction import predict
from holons.finetune.segmenter import finetune_segment

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
TINY = ["steps=2", "batch_size=4", "size=32", "width=8", "image_width=8"]


def _phantoms(out: Path, n: int, seed: int) -> Path:
    from holons.data.synthetic.radiographs import generate_radiographs

    generate_radiographs(out, n=n, seed=seed, size=64, formats=("png",), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return _phantoms(tmp_path_factory.mktemp("ft") / "phantoms", 12, 3)


@pytest.fixture(scope="module")
def new_phantoms(tmp_path_factory) -> Path:
    return _phantoms(tmp_path_factory.mktemp("ft") / "new", 4, 11)


def _lungs_only(src: Path, out: Path, crop: tuple[int, int] | None = None) -> Path:
    """``images/`` + ``masks/lungs/`` (both lungs in one mask), optionally cropped to a non-square
    ``rows x cols`` window: a hospital's lungs-only layout, not JSRT's five structures."""
    (out / "images").mkdir(parents=True)
    (out / "masks" / "lungs").mkdir(parents=True)
    for image in sorted((src / "images").glob("*.png")):
        lungs = read_mask(src / "masks" / "right_lung" / image.name)
        lungs |= read_mask(src / "masks" / "left_lung" / image.name)
        pixels = np.asarray(Image.open(image))
        if crop is not None:
            pixels, lungs = pixels[:crop[0], :crop[1]], lungs[:crop[0], :crop[1]]
        Image.fromarray(pixels).save(out / "images" / image.name)
        Image.fromarray(lungs.astype(np.uint8) * 255).save(out / "masks" / "lungs" / image.name)
    return out


def _lung_dice(pred_dir: Path, table: pd.DataFrame, truth: Path,
               structures: dict[str, list[str]]) -> list[float]:
    """Dice of the predicted PNG and NIfTI masks (read back from the files) against the truth."""
    scores = []
    for _, row in table.iterrows():
        name = Path(row["path"]).stem
        volume = np.asarray(nib.load(str(pred_dir / row["nifti"])).dataobj)
        for k, (structure, parts) in enumerate(structures.items()):
            png = read_mask(pred_dir / row[structure])
            nifti = volume[..., k].T > 0
            gold = np.any([read_mask(truth / "masks" / p / f"{name}.png") for p in parts], axis=0)
            assert png.shape == nifti.shape == gold.shape == (row["height"], row["width"])
            np.testing.assert_array_equal(png, nifti)
            scores.append(dice(png, gold))
    return scores


@pytest.mark.slow
def test_cli_finetune_segment_then_predict_new_phantoms(phantoms, new_phantoms, tmp_path, capsys):
    """Acceptance: trained on the built-in phantoms (all five structures), masks predicted on phantoms of
    another seed read back from the PNG and NIfTI files with Dice > 0.8 on the lungs."""
    model = tmp_path / "seg"
    assert main(["finetune", "segment", "--config", str(CONFIGS / "segment_default.yaml"), "--data",
                 str(phantoms), "--out", str(model), "steps=60"]) == 0
    meta = json.loads((model / "config.json").read_text())
    assert meta["structures"] == ["right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle"]
    assert meta["preprocessing"]["resize"] == "letterbox" and (model / "train.log").is_file()
    assert json.loads((model / "metrics.json").read_text())["val_dice"]["right_lung"] > 0.5
    assert main(["predict", str(model), str(new_phantoms / "images"), "--out", str(tmp_path / "pred")]) == 0
    table = pd.read_csv(tmp_path / "pred" / "masks.csv")
    assert len(table) == 4
    scores = _lung_dice(tmp_path / "pred", table, new_phantoms,
                        {"right_lung": ["right_lung"], "left_lung": ["left_lung"]})
    assert np.mean(scores) > 0.8, scores


def test_lungs_only_non_square_masks_come_back_in_source_geometry(phantoms, tmp_path):
    """A lungs-only set of non-square (64 x 48) images: the structure comes from the data, the model folder
    reloads with it, and predicted masks have each source image's shape and land on its lungs."""
    data = _lungs_only(phantoms, tmp_path / "lungs", crop=(64, 48))
    result = finetune_segment(None, data=data, out=tmp_path / "m", overrides=[
        "steps=25", "size=32", "width=8", "image_width=8", "augment=false"])
    assert result.metrics["structures"] == ["lungs"]
    loaded = load_model(result.folder)
    assert loaded.task == "segment" and loaded.labels == ["lungs"]
    assert loaded.preprocessing.size == 32 and loaded.preprocessing.resize == "letterbox"
    out = predict(result.folder, data / "images", out=tmp_path / "pred", report=None)
    table = pd.read_csv(out.table)
    assert set(table["height"]) == {64} and set(table["width"]) == {48}
    scores = _lung_dice(tmp_path / "pred", table, data, {"lungs": ["lungs"]})
    assert np.mean(scores) > 0.7, scores


def test_segment_modes_few_shot_frozen_and_label_fraction(phantoms, tmp_path):
    frozen = finetune_segment({"mode": "frozen", "shots": 2}, data=phantoms, out=tmp_path / "f",
                              overrides=TINY)
    assert frozen.metrics["n_train"] == 2 and frozen.metrics["mode"] == "frozen"
    start = load_model(frozen.folder).module.backbone.state_dict()
    torch.manual_seed(frozen.config["seed"])  # the frozen encoder is the (seeded) random init it started from
    init = load_backbone("random", "convnext_atto").state_dict()
    assert all(torch.equal(start[k], init[k]) for k in init)
    fraction = finetune_segment(None, data=phantoms, out=tmp_path / "p",
                                overrides=[*TINY, "label_fraction=0.5"])
    n_train = (pd.read_csv(phantoms / "image_table.csv")["split"] == "train").sum()
    assert fraction.metrics["n_train"] == int(np.ceil(n_train / 2))
    with pytest.raises(HolonsError, match="labelled images asked for"):
        finetune_segment(None, data=phantoms, out=tmp_path / "s", overrides=[*TINY, "shots=999"])


def test_run_folder_rules_resume_and_overwrite(phantoms, tmp_path):
    first = finetune_segment(None, data=phantoms, out=tmp_path / "m", overrides=[*TINY, "shots=2"])
    with pytest.raises(HolonsError, match="not empty.*--overwrite"):
        finetune_segment(None, data=phantoms, out=tmp_path / "m", overrides=TINY)
    again = finetune_segment(None, data=phantoms, out=tmp_path / "m", overrides=TINY, resume=True)
    assert again.metrics == first.metrics  # nothing retrained
    replaced = finetune_segment(None, data=phantoms, out=tmp_path / "m", overrides=[*TINY, "shots=3"],
                                overwrite=True)
    assert replaced.metrics["n_train"] == 3


def test_cli_finetune_classify_then_predict_csv(phantoms, new_phantoms, tmp_path, capsys):
    """Phantom findings (cardiomegaly, nodule) as a multi-label manifest: the CSV has one probability
    column per finding and the predicted findings; a corrupt file is reported and skipped."""
    table = pd.read_csv(phantoms / "image_table.csv")
    manifest = tmp_path / "labels.csv"
    pd.DataFrame({"path": [str(phantoms / "images" / f"{i}.png") for i in table["id"]],
                  "cardiomegaly": table["cardiomegaly"], "nodule": table["nodule"]}
                 ).to_csv(manifest, index=False)
    model = tmp_path / "cls"
    assert main(["finetune", "classify", "--data", str(manifest), "--out", str(model), "steps=3",
                 "size=32"]) == 0
    meta = json.loads((model / "config.json").read_text())
    assert meta["tasks"] == ["cardiomegaly", "nodule"] and meta["task"] == "classify"
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((new_phantoms / "images").glob("*.png")):
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    capsys.readouterr()
    assert main(["predict", str(model), str(images), "--out", str(tmp_path / "pred")]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and "broken.png" in err
    out = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False)
    assert list(out.columns) == ["path", "prob_cardiomegaly", "prob_nodule", "predicted"]
    probs = out[["prob_cardiomegaly", "prob_nodule"]].to_numpy()
    assert len(out) == 4 and ((probs >= 0) & (probs <= 1)).all()
    assert pd.read_csv(tmp_path / "pred" / "skipped.csv")["path"].str.endswith("broken.png").all()


def _polarity_classes(src: Path, out: Path) -> Path:
    """A single-label manifest from phantoms: every other image stored as its photographic negative
    (``inverted``, the MONOCHROME1 mix-up of archives), the rest ``normal``; a class a tiny model tells
    apart in a few steps."""
    out.mkdir(parents=True)
    rows = []
    for i, image in enumerate(sorted((src / "images").glob("*.png"))):
        pixels = np.asarray(Image.open(image))
        label = "inverted" if i % 2 else "normal"
        Image.fromarray(255 - pixels if label == "inverted" else pixels).save(out / image.name)
        rows.append({"path": image.name, "label": label})
    pd.DataFrame(rows).to_csv(out / "labels.csv", index=False)
    return out / "labels.csv"


def test_single_label_classifier_beats_chance_on_new_images(phantoms, new_phantoms, tmp_path):
    train = _polarity_classes(phantoms, tmp_path / "train")
    test = _polarity_classes(new_phantoms, tmp_path / "test")
    result = finetune_classify(None, data=train, out=tmp_path / "m",
                               overrides=["steps=30", "size=32", "val_fraction=0", "lr=3e-3",
                                          "encoder_lr=1e-3"])
    assert result.metrics["single_label"] and result.metrics["n_train"] == 12
    out = pd.read_csv(predict(result.folder, test, out=tmp_path / "pred", report=None).table)
    assert list(out.columns) == ["path", "prob_inverted", "prob_normal", "predicted"]
    np.testing.assert_allclose(out["prob_inverted"] + out["prob_normal"], 1.0, atol=1e-6)
    truth = pd.read_csv(test)["label"].to_numpy()
    assert (out["predicted"].to_numpy() == truth).mean() > 0.5


def test_classify_modes_frozen_and_few_shot_keep_every_class(tmp_path, phantoms):
    table = pd.read_csv(phantoms / "image_table.csv")
    manifest = tmp_path / "labels.csv"
    pd.DataFrame({"path": [str(phantoms / "images" / f"{i}.png") for i in table["id"]],
                  "label": np.where(np.arange(len(table)) % 3, "b", "a")}).to_csv(manifest, index=False)
    result = finetune_classify({"mode": "frozen", "shots": 1}, data=manifest, out=tmp_path / "m",
                               overrides=["steps=2", "size=32"])
    assert result.metrics["mode"] == "frozen" and result.metrics["n_train"] == 2  # topped up: one per class


def test_shipped_configs_load_and_unknown_keys_are_named(tmp_path):
    assert load_config(ClassifyConfig, CONFIGS / "classify_default.yaml").lr == pytest.approx(1e-3)
    seg = load_config(SegmentConfig, CONFIGS / "segment_default.yaml")
    assert seg.size == 64 and seg.mode == "finetune" and seg.threshold == 0.5
    with pytest.raises(ConfigError, match="unknown config key stepz"):
        load_config(SegmentConfig, None, ["stepz=3"])
    with pytest.raises(HolonsError, match="unknown preprocessing key"):
        load_config(SegmentConfig, None, {"preprocessing": {"sise": 32}})
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(ClassifyConfig, None, ["label_fraction=0"])


def test_predict_refuses_what_is_not_a_model_folder(tmp_path):
    with pytest.raises(HolonsError, match="not a model folder"):
        load_model(tmp_path)
    assert main(["predict", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def _covid_lung_manifest(folder: Path, out: Path) -> Path:
    """A segmentation manifest (``path,lungs``) of covid_chestxray's images that have a lung mask of
    their own size, non-square ones first."""
    rows = []
    for mask_path in sorted((folder / "annotations" / "lungVAE-masks").glob("*_mask.png")):
        images = sorted((folder / "images").glob(mask_path.name[: -len("_mask.png")] + ".*"))
        if not images:
            continue
        with Image.open(mask_path) as m, Image.open(images[0]) as im:
            if m.size != im.size:
                continue
            w, h = m.size
        rows.append({"path": str(images[0]), "lungs": str(mask_path), "square": abs(h - w) < 0.1 * max(h, w)})
    table = pd.DataFrame(rows).sort_values("square", kind="stable").drop(columns="square")
    table.to_csv(out, index=False)
    return out


@pytest.mark.slow
def test_covid_non_square_predictions_land_on_the_source_lungs(shared_data, tmp_path):
    """Trained on a few real non-square radiographs (letterboxed), the masks `holons predict` writes have
    each original image's height x width and cover its lungs (Dice against the lungVAE mask)."""
    folder = shared_data / "radiographs" / "covid_chestxray"
    if not (folder / "annotations" / "lungVAE-masks").is_dir():
        pytest.skip("covid_chestxray lung masks not available")
    manifest = pd.read_csv(_covid_lung_manifest(folder, tmp_path / "all.csv"))
    if len(manifest) < 14:
        pytest.skip(f"only {len(manifest)} covid_chestxray images with same-size lung masks")
    held = manifest.iloc[:4]  # non-square first
    manifest.iloc[4:14].to_csv(tmp_path / "train.csv", index=False)
    held.to_csv(tmp_path / "held.csv", index=False)
    result = finetune_segment(None, data=tmp_path / "train.csv", out=tmp_path / "m",
                              overrides=["steps=60", "size=64", "val_fraction=0"])
    out = predict(result.folder, tmp_path / "held.csv", out=tmp_path / "pred", report=None)
    table = pd.read_csv(out.table)
    assert len(table) == 4
    scores = []
    for (_, row), (_, truth) in zip(table.iterrows(), held.iterrows(), strict=True):
        gold = read_mask(truth["lungs"])
        png = read_mask(tmp_path / "pred" / row["lungs"])
        assert png.shape == gold.shape == (row["height"], row["width"])
        scores.append(dice(png, gold))
    assert min(table["height"] != table["width"]), "the held-out images are non-square"
    assert np.mean(scores) > 0.6, scores
