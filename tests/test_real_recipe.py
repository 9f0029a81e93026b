"""benchmarks/real_recipe.py and device_real.py: the verdict, pooling over pretraining seeds, resuming, and
runs pretrained elsewhere."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_recipe.py"
_spec = importlib.util.spec_from_file_location("real_recipe", SCRIPT)
recipe = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(recipe)


def _summary(values: dict[str, tuple[float, float, float]]) -> dict:
    """A compare summary with two headline cells per method: (corr. error, its sd, 6-shot Dice)."""
    table = []
    for method, (err, sd, dice) in values.items():
        table.append({"protocol": "correspondence", "metric": "mean error (px)", "setting": "all landmarks",
                      "method": method, "n": 3, "mean": err, "sd": sd, "higher_is_better": False})
        table.append({"protocol": "fewshot-seg", "metric": "Dice 6-shot", "setting": "mean",
                      "method": method, "n": 3, "mean": dice, "sd": 0.01, "higher_is_better": True})
    return {"methods": list(values), "table": table}


def test_verdict_compares_gain_with_the_larger_spread():
    v = recipe.verdict(_summary({"random": (400.0, 6.0, 0.60), "dino": (290.0, 8.0, 0.645),
                                 "adamv2": (270.0, 2.0, 0.650)}))
    corr, dice = v["correspondence mean error (px)"], v["Dice 6-shot, mean"]
    assert corr["vs_dino"] == {"gain": pytest.approx(20.0), "spread": 8.0, "beats": True}
    assert corr["vs_random"]["gain"] == pytest.approx(130.0)
    assert dice["vs_dino"]["gain"] == pytest.approx(0.005) and dice["vs_dino"]["beats"] is False


def test_pooling_over_pretraining_seeds_uses_their_spread_and_pairs_the_seeds():
    summaries = {
        0: _summary({"random": (400.0, 1.0, 0.60), "dino": (290.0, 1.0, 0.64), "adamv2": (270.0, 1.0, 0.65)}),
        1: _summary({"random": (402.0, 1.0, 0.61), "dino": (250.0, 1.0, 0.66), "adamv2": (260.0, 1.0, 0.66)}),
        2: _summary({"random": (398.0, 1.0, 0.59), "dino": (300.0, 1.0, 0.62), "adamv2": (280.0, 1.0, 0.64)}),
    }
    pooled = recipe.pool_over_pretraining(summaries)
    by = {(r["metric"], r["method"]): r for r in pooled["table"]}
    dino = by[("mean error (px)", "dino")]
    assert dino["n"] == 3 and dino["per_seed"] == [290.0, 250.0, 300.0]
    assert dino["mean"] == pytest.approx(280.0) and dino["sd"] == pytest.approx(26.4575, abs=1e-3)
    v = recipe.verdict(pooled)["correspondence mean error (px)"]["vs_dino"]
    # gain 10 px, but the spread is now the sd over pretraining seeds (26.5 px), not the 1-px eval sd
    assert v["gain"] == pytest.approx(10.0) and v["beats"] is False
    paired = recipe.paired_gains(pooled)["correspondence mean error (px)"]["vs_dino"]
    assert paired["mean"] == pytest.approx(10.0) and paired["wins"] == 2 and paired["n"] == 3
    assert paired["sd"] == pytest.approx(17.3205, abs=1e-3)  # differences 20, -10, 20


def test_adamv2_overrides_apply_after_the_shared_ones_and_to_adamv2_alone(tmp_path):
    args = recipe.parse_args(["--set", "optim.momentum_teacher=0.98", "--set", "views.n_global=3",
                              "--set-adamv2", "views.n_global=2", "--steps", "30"])
    config = Path(recipe.__file__).parents[1] / "configs" / "pretrain" / "cpu_real.yaml"
    adamv2 = recipe.budget_config(config, args, 0, tmp_path, args.overrides_adamv2)
    dino = recipe.budget_config(config.with_name("cpu_real_dino.yaml"), args, 0, tmp_path)
    assert adamv2["views"]["n_global"] == 2 and dino["views"]["n_global"] == 3
    assert adamv2["optim"]["momentum_teacher"] == dino["optim"]["momentum_teacher"] == 0.98
    assert recipe.curriculum_steps(adamv2) == recipe.curriculum_steps(dino) == 30


def test_an_interrupted_pretraining_continues_from_its_checkpoint_with_reuse(tmp_path):
    from pretrain_fixtures import tiny_config, write_phantoms

    images = write_phantoms(tmp_path / "images", n=8)
    cfg = tiny_config(images, [{"mode": "localizability", "levels": [0], "steps_per_level": 4}],
                      checkpoint_every=2)
    run, weights = tmp_path / "run", tmp_path / "weights"
    stopped = recipe.pretrain_or_resume({**cfg, "max_steps": 2}, run, reuse=False)
    assert stopped.status == "stopped" and stopped.step == 2
    info = recipe.pretrain_and_export(cfg, run, weights, reuse=True)
    assert not info["reused"] and (weights / "model.safetensors").is_file()
    assert "resumed from" in (run / "train.log").read_text()
    # another config, or no --reuse: the run dir starts over
    restarted = recipe.pretrain_or_resume({**cfg, "seed": 1}, run, reuse=True)
    assert restarted.status == "finished" and "resumed from" not in (run / "train.log").read_text()


@pytest.mark.slow
def test_runs_pretrained_side_by_side_equal_the_runs_pretrained_one_after_another(tmp_path):
    """--jobs 2 pretrains in two spawned processes; each run is seeded by its config alone."""
    import argparse

    from pretrain_fixtures import tiny_config, write_phantoms
    from safetensors.torch import load_file

    images = write_phantoms(tmp_path / "images", n=8)
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 2}]
    configs = {("dino", seed): {**tiny_config(images, stages), "seed": seed} for seed in (0, 1)}
    weights = {}
    for jobs in (1, 2):
        args = argparse.Namespace(out=tmp_path / f"jobs{jobs}", reuse=False, jobs=jobs, threads=1)
        done = recipe.pretrain_runs(args, configs)
        assert list(done) == list(configs) and not any(info["reused"] for info in done.values())
        weights[jobs] = [load_file(Path(done[key]["weights"]) / "model.safetensors") for key in configs]
    for one, two in zip(weights[1], weights[2], strict=True):
        assert one.keys() == two.keys() and all((one[k] == two[k]).all() for k in one)
    assert any((weights[1][0][k] != weights[1][1][k]).any() for k in weights[1][0])  # the seeds differ


def test_runs_packed_on_a_gpu_machine_unpack_into_finished_runs_the_recipe_reuses(tmp_path):
    """device_real.py: pack a finished run (teacher matrices as float16), unpack it into an emptied
    output folder, and the recipe's reuse check finds it finished with an equal config."""
    import torch
    from pretrain_fixtures import tiny_config, write_phantoms
    from safetensors.torch import load_file

    _spec = importlib.util.spec_from_file_location("device_real", SCRIPT.with_name("device_real.py"))
    device_real = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(device_real)

    out = tmp_path / "out"
    images = write_phantoms(tmp_path / "images", n=8)
    cfg = tiny_config(images, [{"mode": "localizability", "levels": [0], "steps_per_level": 2}])
    run, weights = out / "runs" / "dino_s0", out / "weights" / "dino_s0"
    recipe.pretrain_and_export(cfg, run, weights, reuse=False)
    (out / "device_runs.json").write_text("{}\n")
    original = load_file(weights / "model.safetensors")

    files = device_real.pack(out, tmp_path / "back")
    assert [f.name for f in files] == ["runs.tar", "weights_0.tar"]
    for name in ("runs", "weights"):
        shutil.rmtree(out / name)
    assert device_real.unpack(tmp_path / "back", out) == ["dino_s0"]

    restored = load_file(weights / "model.safetensors")
    assert restored.keys() == original.keys()
    rounded = 0
    for key, t in original.items():
        assert restored[key].dtype == t.dtype
        if t.ndim > 1:  # float16 in transit: relative error at most 2^-11 per element (normal range)
            assert torch.allclose(restored[key], t, rtol=2 ** -11, atol=6e-8)
            rounded += not torch.equal(restored[key], t)
        else:  # norms, biases, layer scales travel as float32
            assert torch.equal(restored[key], t)
    assert rounded > 0
    assert recipe.pretrain_and_export(cfg, run, weights, reuse=True)["reused"] is True
