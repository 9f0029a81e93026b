"""Laterality probe: a left-right symmetric set is at chance, a lateralised one is separated; the split
keeps an image and its mirror together; the CLI runs on tiny phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from holons.cli import main
from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.eval.features import load_backbone
from holons.eval.laterality import evaluate_laterality, load_laterality_set

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_folder(root, n: int, symmetric: bool, seed: int = 0):
    """``n`` 32 px PNGs: random blobs, mirrored onto themselves when ``symmetric``, else with a bright
    bar on the image's right (a 'heart' that is always on one side)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = rng.uniform(0, 0.5, (32, 32))
        if symmetric:
            x = (x + x[:, ::-1]) / 2
        else:
            x[8:24, 20:28] += 0.5
        Image.fromarray(np.round(x * 255).astype(np.uint8)).save(root / f"img_{i:02d}.png")
    return root


def test_symmetric_images_are_at_chance_and_lateralised_ones_are_separated(tmp_path):
    torch.manual_seed(0)
    backbone = load_backbone("random", "resnet10t")
    prep = Preprocessing(size=32)
    symmetric = load_laterality_set(_write_folder(tmp_path / "sym", 16, True))
    sym, _ = evaluate_laterality(backbone, symmetric, prep, n_boot=50, device="cpu", progress=False)
    # an image equal to its mirror gives identical features: the probe cannot do better than a coin
    assert sym["auc"] == pytest.approx(0.5) and sym["pair_accuracy"] == 0.0
    lateral = load_laterality_set(_write_folder(tmp_path / "lat", 16, False))
    lat, table = evaluate_laterality(backbone, lateral, prep, n_boot=50, device="cpu", progress=False)
    assert lat["auc"] > 0.9 and lat["pair_accuracy"] > 0.9
    assert lat["auc_lo"] <= lat["auc"] <= lat["auc_hi"]
    assert len(table) == lat["n_test_images"] and lat["n_train_images"] + lat["n_test_images"] == 16


def test_split_is_by_patient_so_mirrors_stay_together(tmp_path):
    from holons.data.synthetic.radiographs import generate_radiographs

    root = tmp_path / "ph"
    generate_radiographs(root, n=9, seed=1, size=32, formats=("png",), workers=1, progress=False)
    data = load_laterality_set(root)
    assert data.name == "annotated" and len(data.paths) == 9
    assert len(set(data.groups)) == 3  # 3 patients x 3 acquisitions
    summary, table = evaluate_laterality(load_backbone("random", "resnet10t"), data, Preprocessing(size=32),
                                         test_fraction=0.5, n_boot=20, device="cpu", progress=False)
    test_patients = {data.groups[[p.name for p in data.paths].index(name)] for name in table["image"]}
    assert summary["n_test_images"] == 3 * len(test_patients)


def test_cli_laterality_on_phantoms(tmp_path, capsys):
    from holons.data.synthetic.radiographs import generate_radiographs

    root = tmp_path / "ph"
    generate_radiographs(root, n=12, seed=2, size=32, formats=("png",), workers=1, progress=False)
    out = tmp_path / "lat"
    assert main(["evaluate", "laterality", "--weights", "random", "--arch", "resnet10t", "--data", str(root),
                 "--out", str(out), "--size", "32", "--n-boot", "20", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "laterality" and res["method"] == "random"
    assert res["preprocessing"]["size"] == 32 and 0.0 <= res["accuracy"] <= 1.0
    assert (out / "pairs.csv").is_file() and "auc [95% CI]" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(HolonsError, match="no images"):
        load_laterality_set(tmp_path / "empty")
