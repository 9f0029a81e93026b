"""The accuracy studies of issues 18, 20 and 21 run end to end through ``holons study`` on tiny data:
cross-lab karyotyping, localization on phantoms (and its figure), distillation (and its random-real arm)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.study import run_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "configs" / "studies"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_crosslab_gband_arm_trains_and_predicts_magnified_cells(tmp_path):
    settings = {"cases": 6, "epoch_steps": 1,
                "sets": ["data.input_size=64", "data.zoom_source_size=64", "train.gnet_epochs=1",
                         "train.lnet_epochs=1", "train.val_every=0", "train.dispatcher_steps=0",
                         "train.device=cpu"]}
    out = tmp_path / "crosslab"
    record = run_study(STUDIES / "karyotype_crosslab.yaml", out, arms=["gband"], progress=False,
                       overrides=settings)
    job = out / "jobs" / "gband_s0"
    own = json.loads((job / "run" / "eval" / "metrics.json").read_text())
    magnified = json.loads((job / "magnified" / "metrics.json").read_text())
    stats = record["arms"]["gband"]
    assert stats["type_accuracy"]["mean"] == pytest.approx(own["type_accuracy"])
    assert stats["magnified_type_accuracy"]["mean"] == pytest.approx(magnified["type_accuracy"])
    cells = (job / "magnified_data" / "manifest.csv").read_text().count("\n") - 1
    assert magnified["test_chromosomes"] == cells  # every magnified chromosome is predicted
    assert "karyonet_type_accuracy" not in {k for k, v in stats.items() if v["n"]}
    assert json.loads((job / "magnified_data" / "style.json").read_text())["style"] == "magnified"


def test_select_rows_keeps_one_band_with_absolute_paths(tmp_path):
    from holons.errors import HolonsError
    from holons.study.steps import select_rows

    (tmp_path / "m.csv").write_text("path,band\na/1.jpg,Gband\na/2.jpg,Rband\n")
    select_rows(str(tmp_path / "m.csv"), str(tmp_path / "g.csv"), "band", "Gband")
    assert (tmp_path / "g.csv").read_text().splitlines()[1:] == [f"{tmp_path / 'a' / '1.jpg'},Gband"]
    with pytest.raises(HolonsError, match="no row"):
        select_rows(str(tmp_path / "m.csv"), str(tmp_path / "q.csv"), "band", "Qband")


def test_localize_study_scores_each_method_and_draws_the_maps(tmp_path):
    from holons.eval.api import localize_maps

    out = tmp_path / "loc"
    record = run_study(STUDIES / "localize_phantoms.yaml", out, arms=["cam", "genpromp"], seeds=[0],
                       progress=False,
                       overrides={"images": 24, "steps": 2})
    for arm in ("cam", "genpromp"):
        results = json.loads((out / "jobs" / f"{arm}_s0" / "eval" / "results.json").read_text())
        assert results["method"] == arm
        assert record["arms"][arm]["box_acc_05"]["mean"] == pytest.approx(results["box_acc@0.5"])
    png = localize_maps({a: out / "jobs" / f"{a}_s0" / "run" for a in ("cam", "genpromp")},
                        out / "phantoms", tmp_path / "maps.png", images=2, device="cpu")
    assert png.stat().st_size > 1000


def test_distill_study_random_real_arm_is_the_matching_start(tmp_path):
    """The random_real arm is distillation with no matching step: its images are the seeded real images
    that the dm arm of the same seed starts from."""
    from holons.config import resolve_config
    from holons.finetune.distill.api import initial_images
    from holons.finetune.distill.config import DistillConfig
    from holons.finetune.distill.data import load_real_set

    manifest = generate_karyotypes(tmp_path / "k", cases=6, seed=2, workers=1)
    out = tmp_path / "distill"
    record = run_study(STUDIES / "distill_pki3.yaml", out, arms=["random_real", "dm"], seeds=[1],
                       progress=False, overrides={"manifest": str(manifest), "iterations": 2,
                                                  "eval_steps": 2, "ipc": 2})
    assert set(record["arms"]) == {"random_real", "dm"}
    cfg = resolve_config(DistillConfig, {"data": {"kind": "karyotype", "size": 32, "stain": "gband"},
                                         "match": {"ipc": 2, "seed": 1}})
    start, _ = initial_images(load_real_set(cfg.data, manifest), cfg)
    folder = out / "jobs" / "random_real_s1" / "run" / "distilled"
    rows = (folder / "manifest.csv").read_text().splitlines()[1:]
    assert len(rows) == len(start) == 48
    for k in (0, 1, 47):
        saved = torch.from_numpy(np.asarray(Image.open(folder / rows[k].split(",")[0]), dtype=np.float32))
        assert torch.equal(255 - saved, (start[k, 0] * 255).round())  # G-band files: dark on light
