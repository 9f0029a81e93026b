"""The shipped studies (configs/studies/*.yaml) and their API steps: the karyotype ablation's arms, its folds,
resuming an interrupted pretraining, and packing runs for the trip back from a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from holons.config import load_config
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.schedule import final_head
from holons.study import run_study
from holons.study.spec import expand_jobs, load_spec

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "configs" / "studies"
ABLATION = STUDIES / "karyotype_ablation.yaml"
QUICK = ["data.input_size=32", "data.zoom_source_size=64", "data.max_train_cases=4", "train.gnet_epochs=1",
         "train.localizer_epochs=1", "train.lnet_rounds=1", "train.lnet_epochs=1",
         "train.localizer_refine_epochs=1", "train.fusion_epochs=1", "train.val_every=0", "train.threads=1",
         "train.device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _call_args(step) -> dict:
    assert step.argv[1:3] == ("-m", "holons.study.call")
    return json.loads(step.argv[4])


@pytest.mark.parametrize("name", sorted(p.name for p in STUDIES.glob("*.yaml")))
def test_shipped_studies_load_and_expand(name, tmp_path):
    spec = load_spec(STUDIES / name)
    _, jobs = expand_jobs(spec, tmp_path)
    assert spec.primary in spec.metrics and jobs and spec.verdicts


def test_ablation_arms_make_the_pairs_explicit(tmp_path):
    # a base config with CutMix on: the study still turns it off everywhere but the CutMix arm
    spec = load_spec(ABLATION, {"sets": ["train.cutmix_prob=0.9", "model.output_head=mean"],
                                "foundation": str(tmp_path / "export dir"), "cutmix_prob": 0.25})
    _, jobs = expand_jobs(spec, tmp_path)
    cfgs = {}
    for job in jobs:
        args = _call_args(job.steps[0])
        cfgs[job.arm] = load_config(KaryotypeConfig, args["config"], args["overrides"])
    assert {n: c.model.variant for n, c in cfgs.items()} == {
        "g_only": "g_only", "l_whole": "l_whole", "varifocal": "varifocal", "sgma_parts": "sgma_parts",
        "pdisconet_parts": "pdisconet_parts",
        "varifocal_foundation": "varifocal", "varifocal_cutmix": "varifocal"}
    assert [c.train.cutmix_prob for c in cfgs.values()] == [0.0] * 6 + [0.25]
    assert final_head(cfgs["g_only"]) == "g"  # the G-Net row reports the G head whatever the base says
    found = cfgs["varifocal_foundation"].model
    assert found.g_pretrained_dir == found.l_pretrained_dir == str(tmp_path / "export dir")
    assert cfgs["varifocal"].model.g_pretrained_dir is None


def test_the_foundation_arm_without_a_foundation_fails_clearly(tmp_path):
    from holons.errors import HolonsError
    from holons.study.steps import karyotype_train

    with pytest.raises(HolonsError, match="foundation"):
        karyotype_train(str(REPO / "configs/finetune/karyotype_pki3_cpu.yaml"), "m.csv", str(tmp_path),
                        ["model.g_pretrained_dir=None"])


def test_ablation_folds_pool_over_the_folds(tmp_path):
    """--set folds=2 --seeds 0 1: each seed is a fold (slide-disjoint), the record pools over them."""
    manifest = generate_karyotypes(tmp_path / "syn", cases=6, seed=1, abnormal_rate=0.0, flip_rate=0.5,
                                   workers=1)
    out = tmp_path / "cv"
    settings = {"manifest": str(manifest), "folds": 2, "sets": [*QUICK, "data.val_fraction=0.2"]}
    record = run_study(ABLATION, out, arms=["g_only"], seeds=[0, 1], progress=False, overrides=settings)
    runs = [out / "jobs" / f"g_only_s{k}" / "run" for k in (0, 1)]
    per_fold = [json.loads((r / "eval" / "metrics.json").read_text()) for r in runs]
    accs = [m["type_accuracy"] for m in per_fold]
    stats = record["arms"]["g_only"]["type_accuracy"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(sum(accs) / 2)
    assert stats["sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    tests = [pd.read_csv(r / "split.csv").query("split == 'test'") for r in runs]
    assert not set(tests[0]["path"]) & set(tests[1]["path"])
    assert set(tests[0]["case_id"]) | set(tests[1]["case_id"]) == set(pd.read_csv(manifest)["case_id"])
    epochs = (runs[0] / "metrics.jsonl").read_text()
    again = run_study(ABLATION, out, arms=["g_only"], seeds=[0, 1], resume=True, progress=False,
                      overrides=settings)
    assert again["arms"] == record["arms"] and (runs[0] / "metrics.jsonl").read_text() == epochs


def test_an_interrupted_pretraining_continues_from_its_checkpoint(tmp_path):
    from pretrain_fixtures import tiny_config, write_phantoms

    from holons.study.steps import curriculum_steps, pretrain_for_steps

    images = write_phantoms(tmp_path / "images", n=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(images, [{"mode": "localizability", "levels": [0],
                                                           "epochs_per_level": 1}], checkpoint_every=2)))
    run = tmp_path / "run"
    stopped = pretrain_for_steps(str(config), str(run), 4, 0, None, device="cpu", max_steps=2)
    assert stopped.status == "stopped" and stopped.step == 2
    done = pretrain_for_steps(str(config), str(run), 4, 0, None, device="cpu")
    assert done.status == "finished" and (run / "exported" / "model.safetensors").is_file()
    assert "resumed from" in (run / "train.log").read_text()
    assert curriculum_steps(yaml.safe_load((run / "config.yaml").read_text())) == 4
    assert pretrain_for_steps(str(config), str(run), 4, 0, None, device="cpu") is None  # finished: reused
    # another config starts over
    restarted = pretrain_for_steps(str(config), str(run), 4, 1, None, device="cpu")
    assert restarted.status == "finished" and "resumed from" not in (run / "train.log").read_text()


def test_budget_overrides_apply_after_the_run_settings(tmp_path):
    from holons.study.steps import budget_config, curriculum_steps

    config = REPO / "configs" / "pretrain" / "cpu_real.yaml"
    shared = ["optim.momentum_teacher=0.98", "views.n_global=3"]
    adamv2 = budget_config(config, 30, 0, tmp_path, overrides=[*shared, "views.n_global=2", "seed=5"])
    dino = budget_config(config.with_name("cpu_real_dino.yaml"), 30, 0, tmp_path,
                         overrides=["views.n_global=3"])
    assert adamv2["views"]["n_global"] == 2 and dino["views"]["n_global"] == 3 and adamv2["seed"] == 5
    assert adamv2["data"]["cache_dir"] == str(tmp_path) and adamv2["data"]["split"] == "train"
    assert curriculum_steps(adamv2) == curriculum_steps(dino) == 30


def test_runs_packed_on_a_gpu_machine_unpack_with_float16_matrices(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from holons.study.transfer import pack, unpack

    src = tmp_path / "study"
    for k in range(3):
        w = src / "jobs" / f"a_s{k}" / "run" / "exported"
        w.mkdir(parents=True)
        save_file({"conv.weight": torch.randn(4, 3, 3, 3), "norm.weight": torch.randn(4) * 1e-7},
                  w / "model.safetensors")
        (w / "config.json").write_text("{}")
    (src / "jobs" / "a_s0" / "run" / "train.log").write_text("log\n")
    (src / "cache").mkdir()
    (src / "cache" / "cache.json").write_text("{}")  # data stays on the machine
    files = pack(src, tmp_path / "back")
    assert [f.name for f in files] == ["outputs.tar", "weights_0.tar", "weights_1.tar"]
    dest = tmp_path / "here"
    weights = unpack(tmp_path / "back", dest)
    assert len(weights) == 3 and (dest / "jobs" / "a_s0" / "run" / "train.log").is_file()
    assert not (dest / "cache").exists()
    for w in weights:
        original = load_file(src / w.relative_to(dest))
        restored = load_file(w)
        assert restored["conv.weight"].dtype == torch.float32
        assert torch.allclose(restored["conv.weight"], original["conv.weight"], rtol=2 ** -11, atol=6e-8)
        assert torch.equal(restored["norm.weight"], original["norm.weight"])  # vectors travel as float32
