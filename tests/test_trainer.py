"""The pretraining engine on tiny phantoms (CPU): learning, resume, SIGTERM, NaN, run-dir rules."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_fixtures import tiny_config, write_phantoms

from holons.cli import main
from holons.errors import ConfigError, HolonsError
from holons.runs import list_checkpoints, load_checkpoint
from holons.ssl.config import PretrainConfig
from holons.ssl.methods import plan_segments
from holons.ssl.student import build_student
from holons.ssl.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("phantoms"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_twenty_steps_lower_the_loss_without_collapse(phantoms, tmp_path):
    cfg = tiny_config(phantoms, [{"mode": "part_whole", "levels": [0], "steps_per_level": 20}], log_every=4)
    result = pretrain(cfg, tmp_path / "run")
    assert result.status == "finished" and result.step == 20 and result.nan_steps == 0
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] - 0.5, (first["loss"], last["loss"])
    # every term is logged on its own; the composition / decomposition branches learn
    assert last["loss_comp"] < first["loss_comp"] and last["loss_dec"] < first["loss_dec"]
    for key in ("lr", "wd", "momentum", "img_per_s", "teacher_entropy", "center_norm", "time_data",
                "time_views", "time_fwd_bwd", "time_update"):
        assert all(r[key] is not None and math.isfinite(r[key]) for r in rows), key
    assert rows[-1]["momentum"] == 1.0  # the EMA schedule ends at 1
    # Collapse watch. One-prototype collapse makes the batch-mean teacher distribution one-hot
    # (entropy 0). A step has 8 images x (1 whole + 4 parts) = 40 teacher distributions; a healthy
    # teacher spreads them over many prototypes, so we require at least sqrt(40) effective
    # prototypes: batch entropy > 0.5 log(min(K, 40)). Uniform collapse makes every distribution
    # flat (entropy log K); the per-sample entropy must stay clearly below it.
    k = cfg["model"]["out_dim"]
    assert all(r["teacher_batch_entropy"] > 0.5 * math.log(min(k, 40)) for r in rows)
    assert all(r["teacher_entropy"] < 0.9 * math.log(k) for r in rows)
    # resolved config and exported teacher in the run dir
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["out_dim"] == k and saved["curriculum"]["stages"][0]["mode"] == "part_whole"
    assert (tmp_path / "run" / "exported" / "model.safetensors").is_file()
    assert "step 20/20" in (tmp_path / "run" / "train.log").read_text()


def test_resume_is_bit_exact(phantoms, tmp_path):
    # Crosses a stage boundary (new schedules, new trainable heads) and a level change after the resume.
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 2},
              {"mode": "part_whole", "levels": [0, 1], "steps_per_level": 2}]
    straight = pretrain(tiny_config(phantoms, stages), tmp_path / "a")
    assert straight.step == 6
    part = pretrain(tiny_config(phantoms, stages, max_steps=3), tmp_path / "b")
    assert part.status == "stopped" and part.step == 3
    resumed = pretrain(tiny_config(phantoms, stages), tmp_path / "b", resume=True)
    assert resumed.status == "finished" and resumed.step == 6
    a = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1][1])
    b = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1][1])
    assert a["step"] == b["step"] == 6 and (b["stage"], b["level"]) == (1, 1)
    for key in ("student", "teacher", "loss", "optimizer", "scaler"):
        _assert_same_tensors(a[key], b[key], key)
    # the metrics of the resumed run continue the straight run's, without duplicates
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def test_nan_steps_are_skipped_then_abort(phantoms, tmp_path):
    stages = [{"mode": "part_whole", "levels": [0], "steps_per_level": 3}]
    cfg = tiny_config(phantoms, stages, debug={"nan_loss_steps": [0]}, max_steps=1)
    result = pretrain(cfg, tmp_path / "skip")
    assert result.nan_steps == 1 and result.step == 1
    # a skipped step changes nothing: student and teacher are still the seed's initialization
    state = load_checkpoint(list_checkpoints(tmp_path / "skip" / "checkpoints")[-1][1])
    torch.manual_seed(0)
    fresh = build_student(_config_obj(cfg))
    _assert_same_tensors(state["student"]["backbone"], fresh.encoder.backbone.model.state_dict(), "student")
    _assert_same_tensors(state["teacher"]["backbone"], fresh.encoder.backbone.model.state_dict(), "teacher")
    assert state["optimizer"]["state"] == {} and state["nan_steps"] == 1
    assert _metrics(tmp_path / "skip")[-1]["nan_steps"] == 1

    abort = tiny_config(phantoms, stages, debug={"nan_loss_steps": [0, 1, 2]}, max_nan_steps=1)
    with pytest.raises(HolonsError, match="diverged: 2 steps with a NaN/inf loss"):
        pretrain(abort, tmp_path / "abort")


def _config_obj(cfg: dict) -> PretrainConfig:
    from holons.config import load_config

    return load_config(PretrainConfig, None, cfg)


def test_run_dir_rules_and_config_errors(phantoms, tmp_path):
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 1}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(HolonsError, match="not empty"):
        pretrain(tiny_config(phantoms, stages), run)
    with pytest.raises(HolonsError, match="not from a holons run"):
        pretrain(tiny_config(phantoms, stages), run, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="--resume and init_from"):
        pretrain(tiny_config(phantoms, stages, init_from=str(run)), tmp_path / "x", resume=True)
    with pytest.raises(ConfigError, match="method: 'mae' is not one of"):
        pretrain(tiny_config(phantoms, stages, method="mae"), tmp_path / "m")
    with pytest.raises(ConfigError, match="optim.lrr"):
        pretrain(tiny_config(phantoms, stages), tmp_path / "y", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="curriculum.stages\\[0\\]"):
        pretrain(tiny_config(phantoms, [{"mode": "part_whole", "levels": [0]}]), tmp_path / "z")
    # the CLI names the unknown key in one line and exits 2
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(phantoms, stages)))
    assert main(["pretrain", "--config", str(cfg_file), "--out", str(tmp_path / "c"), "views.bogus=1"]) == 2


def test_a_run_dir_without_checkpoint_is_reused(phantoms, tmp_path, capsys):
    """A run that fails before its first checkpoint leaves train.log and checkpoints/ behind; the same
    command again (after fixing the cause) is not refused: the leftovers are cleared, and said so."""
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 1}]
    run = tmp_path / "run"
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(yaml.safe_dump(tiny_config(tmp_path / "no_such_folder", stages)))
    good.write_text(yaml.safe_dump(tiny_config(phantoms, stages)))
    assert main(["pretrain", "--config", str(bad), "--out", str(run)]) == 2
    assert (run / "train.log").is_file() and (run / "checkpoints").is_dir()  # the leftovers
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')  # as if it had logged a step
    capsys.readouterr()
    assert main(["pretrain", "--config", str(good), "--out", str(run)]) == 0
    log_text = (run / "train.log").read_text()
    assert "had no checkpoint" in log_text and "cleared its leftovers" in log_text
    assert "no_such_folder" not in log_text  # the failed run's log went with it
    assert [r["step"] for r in _metrics(run)] == [1]
    # now it holds a checkpoint: a run to protect
    with pytest.raises(HolonsError, match="not empty \\(it holds a checkpoint at step 1\\)"):
        pretrain(tiny_config(phantoms, stages), run)


def test_resume_needs_a_checkpoint_and_the_old_config_keys_are_named(phantoms, tmp_path):
    """--resume on a folder without a checkpoint is one clear error; a config that still holds the
    old ``resume`` / ``overwrite`` keys is told to pass the CLI flag instead."""
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 1}]
    with pytest.raises(HolonsError, match="nothing to resume .* holds no checkpoint"):
        pretrain(tiny_config(phantoms, stages), tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match="'resume' is no longer a config key; remove it and pass --resume"):
        pretrain(tiny_config(phantoms, stages, resume=True), tmp_path / "old")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        pretrain(tiny_config(phantoms, stages), tmp_path / "old", ["overwrite=true"])
    cfg_file = tmp_path / "old.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(phantoms, stages, resume=False)))
    with pytest.raises(ConfigError, match=re.escape(f"{cfg_file}: 'resume' is no longer a config key")):
        pretrain(cfg_file, tmp_path / "old")
    assert not (tmp_path / "old").exists()


def test_overwrite_and_init_from(phantoms, tmp_path):
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 1}]
    pretrain(tiny_config(phantoms, stages), tmp_path / "run")
    again = pretrain(tiny_config(phantoms, stages), tmp_path / "run", overwrite=True)
    assert again.step == 1 and [r["step"] for r in _metrics(tmp_path / "run")] == [1]
    init = pretrain(tiny_config(phantoms, stages, init_from=str(tmp_path / "run"), max_steps=0),
                    tmp_path / "init")
    assert init.step == 0
    _assert_same_tensors(init.teacher.state_dict(), again.teacher.state_dict(), "teacher")


def test_dino_method_is_one_localizability_stage_at_level_zero():
    stages = [{"mode": "localizability", "levels": [0, 1, 2], "steps_per_level": 5},
              {"mode": "part_whole", "levels": [0, 1, 2], "steps_per_level": 7}]
    cfg = _config_obj({"method": "dino", "data": {"images_dir": "x", "batch_size": 8},
                       "curriculum": {"stages": stages}})
    segs = plan_segments(cfg, steps_per_epoch=4)
    assert [(s.mode, s.level, s.start, s.steps) for s in segs] == [("localizability", 0, 0, 36)]
    cfg.method = "adamv2"
    segs = plan_segments(cfg, steps_per_epoch=4)
    assert [(s.stage, s.level) for s in segs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert segs[-1].end == 36


def test_shipped_configs_load():
    for name in ("cpu_tiny", "cpu_tiny_dino", "gpu_convnext_b"):
        cfg = _config_obj(yaml.safe_load((REPO / "configs" / "pretrain" / f"{name}.yaml").read_text()))
        assert cfg.model.backbone
    gpu = _config_obj(yaml.safe_load((REPO / "configs" / "pretrain" / "gpu_convnext_b.yaml").read_text()))
    assert (gpu.model.backbone, gpu.model.out_dim, gpu.views.global_size, gpu.views.local_size) == (
        "convnext_base", 65536, 224, 96)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(phantoms, tmp_path):
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 500}]
    cfg_file = tmp_path / "long.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(phantoms, stages)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "holons", "pretrain", "--config", str(cfg_file), "--out",
                             str(run)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # No clock: the run either logs its first step or exits (and the test fails with its output),
        # and after the signal it either stops or ends its 500 steps (and the exit status shows it).
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err  # interrupted, not finished: exits like the signal
    assert "stopped by SIGTERM" in err and f"--out {run} --resume" in err
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts, "no checkpoint written on SIGTERM"
    state = load_checkpoint(ckpts[-1][1])  # weights_only=True
    assert 1 <= state["step"] < 500 and state["step"] == _metrics(run)[-1]["step"]
    # the command it prints continues the run
    assert main(["pretrain", "--config", str(cfg_file), "--out", str(run), "--resume", "max_steps=" +
                 str(state["step"] + 1)]) == 0
    assert _metrics(run)[-1]["step"] == state["step"] + 1


def test_koleo_term_is_logged_and_trains(phantoms, tmp_path):
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 4}]
    cfg = tiny_config(phantoms, stages, log_every=2)
    cfg["loss"] = {**cfg.get("loss", {}), "w_koleo": 0.1}
    result = pretrain(cfg, tmp_path / "run")
    assert result.status == "finished" and result.nan_steps == 0
    rows = _metrics(tmp_path / "run")
    assert all("loss_koleo" in r and math.isfinite(r["loss_koleo"]) for r in rows)
    # the total is the localizability term plus the weighted spreading term
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_loc"] + 0.1 * rows[-1]["loss_koleo"], rel=1e-4)
