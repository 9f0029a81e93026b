"""benchmarks/karyotype_ablation.py: the five runs, the table, reuse of finished runs, failures recorded."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from holons.config import load_config
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.schedule import final_head

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "karyotype_ablation.py"
_spec = importlib.util.spec_from_file_location("karyotype_ablation", SCRIPT)
ablation = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(ablation)

RATES = ("type_accuracy", "polarity_accuracy", "macro_f1", "case_accuracy_none", "case_accuracy_greedy",
         "case_accuracy_optimal", "cases_fully_correct_optimal")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cells(folder: Path, cases: int, seed: int, abnormal_rate: float = 0.0) -> Path:
    """A small synthetic karyotype set (half the chromosomes upside down); returns its manifest."""
    return generate_karyotypes(folder, cases=cases, seed=seed, abnormal_rate=abnormal_rate, flip_rate=0.5,
                               workers=1)


def test_runs_make_the_pairs_explicit(tmp_path):
    runs = ablation.ablation_runs(tmp_path / "export dir", cutmix_prob=0.25)
    assert [r.name for r in runs] == list(ablation.VARIANTS)
    # a base config with CutMix on: the ablation still turns it off everywhere but the CutMix run
    base = ["train.cutmix_prob=0.9"]
    cfgs = {r.name: load_config(KaryotypeConfig, ablation.DEFAULT_CONFIG, [*base, *r.overrides])
            for r in runs}
    assert {n: c.model.variant for n, c in cfgs.items()} == {
        "g_only": "g_only", "l_whole": "l_whole", "varifocal": "varifocal",
        "varifocal_foundation": "varifocal", "varifocal_cutmix": "varifocal"}
    assert [c.train.cutmix_prob for c in cfgs.values()] == [0.0, 0.0, 0.0, 0.0, 0.25]
    # the G-Net-only row reports the G head even where the base config asks for G + L averaged
    g_only = load_config(KaryotypeConfig, ablation.DEFAULT_CONFIG,
                         ["model.output_head=mean", *runs[0].overrides])
    assert final_head(g_only) == "g"
    found = cfgs["varifocal_foundation"].model
    assert found.g_pretrained_dir == found.l_pretrained_dir == str(tmp_path / "export dir")
    assert cfgs["varifocal"].model.g_pretrained_dir is None


@pytest.mark.slow
def test_quick_ablation_table_reuse_and_failures(tmp_path, capsys):
    manifest = _cells(tmp_path / "syn", cases=8, seed=0, abnormal_rate=0.2)
    wrong = tmp_path / "export"  # an export of another architecture: that run fails, the others go on
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    (wrong / "model.safetensors").write_bytes(b"")
    out = tmp_path / "ablation"
    common = ["--manifest", str(manifest), "--out", str(out), "--quick", "--device", "cpu",
              "--set", "train.threads=1"]

    assert ablation.main([*common, "--foundation", str(wrong)]) == 1  # one run failed
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["runs"]}
    assert list(rows) == list(ablation.VARIANTS)
    assert rows["varifocal_foundation"]["status"] == "failed"
    assert "resnet18" in rows["varifocal_foundation"]["note"]
    trained = [n for n in ablation.VARIANTS if n != "varifocal_foundation"]
    for name in trained:
        row = rows[name]
        assert row["status"] == "finished", row.get("note")
        for key in RATES:
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert row["train_seconds"] > 0 and row["test_chromosomes"] > 0
        # the numbers are the run's own eval/metrics.json
        saved = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert row["type_accuracy"] == saved["type_accuracy"]
        assert row["cases_fully_correct_optimal"] == saved["cases_fully_correct_optimal"]
    assert [rows[n]["head"] for n in trained] == ["g", "fusion", "fusion", "fusion"]
    assert len({rows[n]["test_split"] for n in trained}) == 1  # one test split for all
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(ablation.VARIANTS)  # header + one row per run
    assert "identical in every run: yes" in table
    assert "| G-Net only | g |" in capsys.readouterr().out

    # a rerun reuses finished runs without training, and skips the foundation run without --foundation
    epochs = (out / "varifocal" / "metrics.jsonl").read_text()
    assert ablation.main([*common, "--variants", "g_only", "varifocal", "varifocal_foundation"]) == 0
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(again) == ["g_only", "varifocal", "varifocal_foundation"]
    assert again["g_only"]["status"] == again["varifocal"]["status"] == "reused"
    assert again["varifocal_foundation"]["status"] == "skipped"
    assert again["varifocal"]["type_accuracy"] == rows["varifocal"]["type_accuracy"]
    assert (out / "varifocal" / "metrics.jsonl").read_text() == epochs

    # a finished run made with another config is reported, not mixed into the table
    assert ablation.main([*common, "--variants", "g_only", "--set", "train.gnet_epochs=2"]) == 1
    changed = json.loads((out / "results.json").read_text())["runs"][0]
    assert changed["status"] == "failed" and "train.gnet_epochs" in changed["note"]


@pytest.mark.slow
def test_jobs_split_the_rows_and_the_table_collects_them(tmp_path):
    assert ablation.job_variants(["a", "b", "c"], 2) == [["a", "c"], ["b"]]
    assert ablation.job_variants(["a"], 3) == [["a"]]
    argv = ["--out", "o", "--variants", "g_only", "varifocal", "--set", "a=1", "--jobs=2", "--quick"]
    assert ablation._argv_without(argv, ("--variants", "--jobs")) == ["--out", "o", "--set", "a=1", "--quick"]
    manifest = _cells(tmp_path / "syn", cases=6, seed=2)
    out = tmp_path / "jobs"
    argv = ["--manifest", str(manifest), "--out", str(out), "--quick", "--device", "cpu",
            "--set", "train.threads=1", "--variants", "g_only", "l_whole", "--jobs", "2"]
    assert ablation.main(argv) == 0
    for k, name in enumerate(["g_only", "l_whole"]):  # each row trained by its own process
        assert f"== 1/1 {name}" in (out / "jobs" / f"job{k}.log").read_text()
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["name"], r["status"]) for r in rows] == [("g_only", "reused"), ("l_whole", "reused")]
    for r in rows:
        saved = json.loads((out / r["name"] / "eval" / "metrics.json").read_text())
        assert r["type_accuracy"] == saved["type_accuracy"]
    assert ablation.main([*argv[:-1], "0"]) == 2


def test_folds_cross_validate_each_row_by_slide(tmp_path):
    manifest = _cells(tmp_path / "syn", cases=6, seed=1)
    out = tmp_path / "cv"
    common = ["--manifest", str(manifest), "--out", str(out), "--quick", "--device", "cpu",
              "--set", "train.threads=1", "data.val_fraction=0.2", "--variants", "g_only", "--folds", "2"]
    assert ablation.main(common) == 0
    results = json.loads((out / "results.json").read_text())
    (row,) = results["runs"]
    assert results["folds"] == 2 and row["status"] == "finished" and len(row["folds"]) == 2
    folders = [out / "g_only" / f"fold{k}" for k in (0, 1)]
    per_fold = [json.loads((f / "eval" / "metrics.json").read_text()) for f in folders]
    accs = [m["type_accuracy"] for m in per_fold]
    assert row["type_accuracy"] == pytest.approx(sum(accs) / 2)
    assert row["type_accuracy_sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert row["test_chromosomes"] == sum(m["test_chromosomes"] for m in per_fold)
    # the two folds test on disjoint slides that together cover every case
    tests = [pd.read_csv(f / "split.csv").query("split == 'test'") for f in folders]
    assert not set(tests[0]["path"]) & set(tests[1]["path"])
    assert set(tests[0]["case_id"]) | set(tests[1]["case_id"]) == set(pd.read_csv(manifest)["case_id"])
    table = (out / "results.md").read_text()
    assert "2-fold cross-validation by slide" in table and " ± " in table
    assert ablation.main(common) == 0  # rerun: both folds reused
    assert json.loads((out / "results.json").read_text())["runs"][0]["status"] == "reused"
    assert ablation.main([*common[:-2], "--folds", "1"]) == 2
