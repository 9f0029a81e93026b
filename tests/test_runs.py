"""The run layer (holons.runs): run-folder rules, checkpoint rotation and provenance, the run log,
the device rule and the resumed-config check. Tiny files only, no training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from holons import __version__
from holons.errors import HolonsError
from holons.runs import (
    RunLog,
    capture_rng_state,
    changed_keys,
    checkpoint_path,
    git_commit,
    has_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_run,
    resolve_checkpoint,
    resolve_device,
    restore_rng_state,
    save_checkpoint,
    write_checkpoint,
)

LOG = logging.getLogger("holons.test_runs")
REPO = Path(__file__).resolve().parents[1]


def _leftovers(run):
    """What a run that failed before its first checkpoint leaves behind."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.log").write_text("failed\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.yaml").write_text("seed: 0\n")


def _checkpointed(run, step=5):
    _leftovers(run)
    save_checkpoint({"step": step}, run / "checkpoints", step)


# ------------------------------------------------------------------------------------- folder rules
def test_a_new_or_empty_folder_is_a_fresh_run(tmp_path):
    run = prepare_run(tmp_path / "new" / "run")
    assert run.checkpoints.is_dir() and not run.resume and run.cleared == []
    (tmp_path / "empty").mkdir()
    assert prepare_run(tmp_path / "empty").cleared == []


def test_leftovers_without_a_checkpoint_are_cleared_and_the_folder_reused(tmp_path):
    run_dir = tmp_path / "run"
    _leftovers(run_dir)
    (run_dir / "split.csv").write_text("path\n")  # a trainer's own leftover, declared by it
    run = prepare_run(run_dir, leftovers=("split.csv",))
    assert run.cleared == ["checkpoints", "config.yaml", "metrics.jsonl", "split.csv", "train.log"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]
    assert not run.resume


def test_a_finished_result_without_checkpoint_is_not_a_leftover(tmp_path):
    """A folder whose checkpoints were deleted but whose export is there is refused, not emptied."""
    run_dir = tmp_path / "run"
    _leftovers(run_dir)
    (run_dir / "exported").mkdir()
    with pytest.raises(HolonsError, match="not empty .* --resume .* --overwrite"):
        prepare_run(run_dir, results=("exported",))
    assert (run_dir / "exported").is_dir()
    prepare_run(run_dir, overwrite=True, results=("exported",))
    assert not (run_dir / "exported").exists()


def test_a_folder_with_a_checkpoint_is_refused_in_one_line_naming_the_flags(tmp_path):
    run_dir = tmp_path / "run"
    _checkpointed(run_dir, step=5)
    with pytest.raises(HolonsError) as info:
        prepare_run(run_dir)
    message = str(info.value)
    assert "\n" not in message and "a checkpoint at step 5" in message
    assert "--resume" in message and "--overwrite" in message
    assert has_checkpoint(run_dir)
    # named checkpoints (karyotype phases) count the same
    other = tmp_path / "karyo"
    (other / "checkpoints").mkdir(parents=True)
    torch.save({}, other / "checkpoints" / "gnet.pt")
    with pytest.raises(HolonsError, match="the checkpoint gnet.pt"):
        prepare_run(other)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(HolonsError, match="nothing to resume .* no checkpoint"):
        prepare_run(tmp_path / "new", resume=True)
    _leftovers(tmp_path / "failed")
    with pytest.raises(HolonsError, match="nothing to resume"):
        prepare_run(tmp_path / "failed", resume=True)
    _checkpointed(tmp_path / "run")
    run = prepare_run(tmp_path / "run", resume=True)
    assert run.resume and run.cleared == [] and (run.log_file).read_text() == "failed\n"  # nothing cleared


def test_overwrite_clears_a_run_but_never_foreign_files(tmp_path):
    run_dir = tmp_path / "run"
    _checkpointed(run_dir)
    (run_dir / "model").mkdir()
    run = prepare_run(run_dir, overwrite=True, results=("model",))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"] and not has_checkpoint(run_dir)
    assert not run.resume
    mine = tmp_path / "mine"
    _checkpointed(mine)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(HolonsError, match="not from a holons run \\(notes.txt"):
        prepare_run(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine" and has_checkpoint(mine)
    with pytest.raises(HolonsError, match="not empty"):  # foreign files, no checkpoint: not leftovers
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "notes.txt").write_text("mine")
        prepare_run(tmp_path / "home")


def test_resume_and_overwrite_together_and_a_file_are_errors(tmp_path):
    with pytest.raises(HolonsError, match="either --resume or --overwrite"):
        prepare_run(tmp_path / "run", resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(HolonsError, match="not a folder"):
        prepare_run(tmp_path / "file")


# ------------------------------------------------------------------------------------- checkpoints
def test_rotation_keeps_the_newest_and_the_protected_steps(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 50):
        save_checkpoint({"step": step}, ckpt, step, keep_last=2, keep_steps={20})
    assert [s for s, _ in list_checkpoints(ckpt)] == [20, 40, 50]
    assert latest_checkpoint(ckpt) == checkpoint_path(ckpt, 50)
    assert resolve_checkpoint(tmp_path) == checkpoint_path(ckpt, 50)
    for step in (60, 70):
        save_checkpoint({"step": step}, ckpt, step, keep_last=0)
    assert [s for s, _ in list_checkpoints(ckpt)] == [20, 40, 50, 60, 70]  # 0 keeps all
    with pytest.raises(HolonsError, match="no usable checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_every_checkpoint_carries_versions_and_git_commit(tmp_path):
    path = save_checkpoint({"step": 1, "w": torch.ones(2)}, tmp_path, 1)
    named = write_checkpoint({"phase": "gnet"}, tmp_path / "gnet.pt")
    for p in (path, named):
        state = torch.load(p, weights_only=True)  # tensors and primitives only
        assert state["format"] == 1
        assert set(state["versions"]) >= {"holons", "torch", "timm", "python"}
        assert state["versions"]["holons"] == __version__
        assert state["versions"]["torch"] == str(torch.__version__)
        assert state["git_commit"] == git_commit()
    if (REPO / ".git").exists():  # a clone or worktree (an installed sdist records None)
        commit = git_commit()
        assert commit is not None and len(commit.removesuffix("+dirty")) == 40
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


def test_a_foreign_or_damaged_checkpoint_is_one_clear_error(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(HolonsError, match="not a holons training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert load_checkpoint(tmp_path / "foreign.pt", unversioned_ok=True)["weights"].sum() == 1
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(HolonsError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(HolonsError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    path = write_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = torch.rand(3)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------- log, device, config
def test_run_log_writes_train_log_and_metrics_and_truncates_on_resume(tmp_path, capsys):
    with RunLog(tmp_path, LOG) as record:
        LOG.info("hello")
        for step in (1, 2, 3):
            record.metrics({"step": step, "loss": 1.0 / step})
    assert "hello" in (tmp_path / "train.log").read_text() and "hello" in capsys.readouterr().err
    with RunLog(tmp_path, LOG, resume_step=2, announce=False):
        pass
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    with RunLog(tmp_path / "rank1", LOG, active=False) as record:  # other ranks write nothing
        record.metrics({"step": 1})
    assert not (tmp_path / "rank1").exists()
    assert LOG.handlers == []


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    with pytest.raises(HolonsError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(HolonsError, match="no CUDA device"):
            resolve_device("cuda:1")


def test_changed_keys_names_differences_and_ignores_new_or_run_control_keys():
    old = {"seed": 0, "max_steps": 5, "optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "gone": 1}
    new = {"seed": 0, "max_steps": 9, "optim": {"lr": 0.2, "betas": [0.9, 0.99], "added": 3}}
    assert changed_keys(old, new, ignore=("max_steps",)) == ["optim.lr"]
    assert changed_keys(old, new) == ["max_steps", "optim.lr"]
