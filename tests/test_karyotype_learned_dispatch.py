"""Learned dispatch as a dispatch method: fitted on a run (in training or by `karyotype fit-dispatch`),
compared with the rules on the test split, and used by `karyotype predict --dispatch learned` with the
same numbers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from holons.cli import main as cli_main
from holons.config import load_config
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.errors import HolonsError
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.dispatch import ALL_METHODS, LEARNED_METHODS, dispatch_case
from holons.finetune.karyotype.fit_dispatch import NO_DISPATCHER, REPORT_FILE
from holons.finetune.karyotype.inference import predict_dataset, predict_with_features
from holons.finetune.karyotype.learned_dispatch import META_FILE, WEIGHTS_FILE
from holons.finetune.karyotype.model_folder import load_model, run_datasets
from holons.finetune.karyotype.predict import predict_karyotypes
from holons.finetune.karyotype.train import train_karyotype

TINY = "configs/finetune/karyotype_cpu_tiny.yaml"
KEYS = ("type_accuracy", "case_accuracy", "cases_fully_correct")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny G + L model (head ``mean``, test-time flips) trained with ``train.dispatcher_steps``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("learned")
    manifest = generate_karyotypes(root / "syn", cases=12, seed=3, workers=1)
    over = ["model.variant=l_whole", "model.output_head=mean", "data.input_size=48", "data.max_train_cases=5",
            "train.gnet_epochs=3", "train.lnet_epochs=2", "train.epoch_steps=30", "train.fusion_epochs=0",
            "train.test_time_hflip=true", "train.test_time_vflip=true", "train.eval_batch_size=64",
            "train.dispatcher_steps=12"]
    summary = train_karyotype(load_config(KaryotypeConfig, TINY, over), manifest, root / "run")
    split = pd.read_csv(root / "run" / "split.csv", dtype={"case_id": str})
    rows = pd.read_csv(manifest, dtype={"case_id": str, "slide_id": str})
    test_rows = rows.set_index("path").loc[split.loc[split["split"] == "test", "path"]].reset_index()
    test_manifest = root / "syn" / "test_manifest.csv"  # paths are relative to their manifest
    test_rows.to_csv(test_manifest, index=False)
    yield {"root": root, "manifest": manifest, "test_manifest": test_manifest, "summary": summary,
           "dir": root / "run"}
    torch.set_num_threads(before)


def test_training_fits_the_dispatcher_and_reports_it(run):
    summary, folder = run["summary"], run["dir"]
    assert summary["type_accuracy"] > 0.1  # above chance: the comparisons below mean something
    assert (folder / "model" / WEIGHTS_FILE).is_file() and (folder / "model" / META_FILE).is_file()
    report = json.loads((folder / "eval" / REPORT_FILE).read_text())
    assert report["steps"] == 12 and list(report["methods"]) == list(ALL_METHODS)
    for method in ALL_METHODS:
        assert set(report["methods"][method]) == set(KEYS)
    for method in ("none", "greedy", "optimal"):  # the rules' numbers are the run's own evaluation
        for key in KEYS:
            assert report["methods"][method][key] == summary[f"{key}_{method}"], (method, key)
    for method in LEARNED_METHODS:
        for key in KEYS:
            assert summary[f"{key}_{method}"] == report["methods"][method][key]
    assert summary["dispatcher_val_accuracy"] == report["val_accuracy"]
    written = json.loads((folder / "eval" / "metrics.json").read_text())
    assert written["type_accuracy_learned"] == summary["type_accuracy_learned"]


def test_features_concatenate_g_and_l_and_keep_the_probabilities(run):
    model, meta = load_model(run["dir"])
    test = run_datasets(run["dir"], run["manifest"], meta, names=("test",))["test"]
    cpu = torch.device("cpu")
    with_features = predict_with_features(model, test, "mean", cpu, 64, hflip=True, vflip=True)
    types, pols = predict_dataset(model, test, "mean", cpu, 64, hflip=True, vflip=True)
    assert torch.equal(with_features.types, types) and torch.equal(with_features.polarity, pols)
    dims = model.g_type.in_features + model.l_type.in_features
    assert with_features.features.shape == (len(test), dims)
    assert torch.allclose(with_features.log_probs.exp(), types.clamp_min(1e-12))


def test_fit_dispatch_cli_and_predict_learned_agree(run, capsys):
    root, folder = run["root"], run["dir"]
    fitted = json.loads((folder / "eval" / REPORT_FILE).read_text())
    plain = root / "plain_model"  # a copy without the dispatcher, for the refusal below
    shutil.copytree(folder / "model", plain)
    for name in (WEIGHTS_FILE, META_FILE):
        (plain / name).unlink()

    # the CLI refits from split.csv + manifest; same steps and seed as in training: the same dispatcher
    rc = cli_main(["karyotype", "fit-dispatch", "--run", str(folder), "--data", str(run["manifest"]),
                   "--steps", "12", "--seed", "0", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert all(method in out for method in ALL_METHODS) and "type acc" in out
    report = json.loads((folder / "eval" / REPORT_FILE).read_text())
    assert report["methods"] == fitted["methods"] and report["val_accuracy"] == fitted["val_accuracy"]

    pred = root / "pred"
    rc = cli_main(["karyotype", "predict", "--model", str(folder), "--data", str(run["test_manifest"]),
                   "--out", str(pred), "--dispatch", "learned", "--batch-size", "64"])
    assert rc == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    for method in ALL_METHODS:
        for key in KEYS:
            assert metrics[f"{key}_{method}"] == report["methods"][method][key], (method, key)
    for key in ("type_accuracy", "case_accuracy_optimal", "cases_fully_correct_optimal"):
        assert metrics[key] == run["summary"][key]
    info = json.loads((pred / "predict_info.json").read_text())
    assert info["dispatch"] == "learned" and info["learned_dispatcher"] is True
    frame = pd.read_csv(pred / "predictions.csv")
    right = frame["dispatched_class_1to24"] == frame["true_class_1to24"]
    assert right.mean() == pytest.approx(metrics["type_accuracy_learned"])

    # a model folder without a dispatcher: one clear line, from the API and from the CLI
    with pytest.raises(HolonsError, match="no learned dispatcher"):
        predict_karyotypes(plain, run["test_manifest"], root / "refused", dispatch="learned", device="cpu")
    rc = cli_main(["karyotype", "predict", "--model", str(plain), "--data", str(run["test_manifest"]),
                   "--out", str(root / "refused"), "--dispatch", "learned_then_optimal"])
    err = capsys.readouterr().err
    assert rc == 2 and NO_DISPATCHER in err and err.count("\n") == 1
    # without a dispatcher the rules still work and report no learned metrics
    result = predict_karyotypes(plain, run["test_manifest"], root / "rules", batch_size=64, device="cpu")
    assert "type_accuracy_learned" not in result["metrics"]
    assert result["metrics"]["type_accuracy_optimal"] == run["summary"]["type_accuracy_optimal"]
    # the default dispatch: optimal without a dispatcher, learned then optimal with one
    assert result["dispatch"] == "optimal"
    auto = predict_karyotypes(folder, run["test_manifest"], root / "auto", batch_size=64, device="cpu")
    assert auto["dispatch"] == "learned_then_optimal"


def test_dispatch_case_learned_methods_read_the_refined_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(24), size=46)
    refined = np.eye(24)[np.concatenate([np.repeat(np.arange(22), 2), [22, 23]])] * 0.9 + 0.1 / 24
    learned = dispatch_case(probs, "learned", refined=refined)
    assert (learned.labels == refined.argmax(1)).all() and learned.sex == "XY" and not learned.warnings
    assert len(learned.changed) == int((probs.argmax(1) != refined.argmax(1)).sum())  # against the classifier
    assert (dispatch_case(probs, "learned_then_optimal", refined=refined).labels == refined.argmax(1)).all()
    with pytest.raises(ValueError, match="refined"):
        dispatch_case(probs, "learned")
