"""DDP on CPU (gloo) against a one-process run with the same global batch: 2 processes on one node
(``--standalone``), 2 nodes x 1 process through a c10d rendezvous on localhost, and resume across a
changed world size (2 -> 1, 1 -> 2)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pretrain_fixtures import tiny_config, write_phantoms

from holons.ssl.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")]

WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from holons.ssl.trainer import pretrain
cfg, out, dump, resume = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "resume"
result = pretrain(cfg, out, resume=resume)
torch.save(result.student.state_dict(), os.path.join(dump, f"rank{os.environ['RANK']}.pt"))
"""


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    """The tiny config and its one-process run: initial and final student weights, losses."""
    root = tmp_path_factory.mktemp("ddp_reference")
    images = write_phantoms(root / "phantoms", n=16)
    # Crosses a stage change (the DDP wrapper is rebuilt with the part-whole heads trainable) and
    # skips a NaN step (no backward on any rank) so that both paths are exercised under DDP.
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 3},
              {"mode": "part_whole", "levels": [0], "steps_per_level": 3}]
    cfg = tiny_config(images, stages, debug={"nan_loss_steps": [1]}, checkpoint_every=3, keep_checkpoints=4)
    # Each rank draws the views of its half of the global batch from its own seeded generator;
    # view_groups=2 makes a one-process run draw exactly the same views.
    cfg["data"]["view_groups"] = 2
    torch.set_num_threads(1)
    init = pretrain({**cfg, "max_steps": 0}, root / "init").student.state_dict()
    single = pretrain(cfg, root / "single")
    return {"cfg": cfg, "init": init, "weights": single.student.state_dict(),
            "losses": _losses(root / "single")}


def _torchrun(launcher: list[str], cfg: dict, out: Path, dump: Path,
              resume: bool = False) -> subprocess.Popen:
    """One ``torch.distributed.run`` launcher process running the worker script."""
    script = dump / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), json.dumps(cfg), str(out),
         str(dump), "resume" if resume else "new"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]


def _rank_weights(dump: Path) -> dict[str, torch.Tensor]:
    """Rank 0's final student weights, after checking that rank 1 holds the same."""
    rank0 = torch.load(dump / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    return rank0


def _assert_matches_single(weights: dict[str, torch.Tensor], losses: list[float | None], ref: dict) -> None:
    """Same images, same views, same initial weights; each rank's loss is the mean over its half and
    DDP averages the gradients, which equals the gradient of the full-batch mean; the centre is
    all-reduced (sum and count). What remains is float32 summation order (gloo all-reduce of two
    half-batch gradients vs one full-batch sum): relative differences of order 1e-7 per operation,
    so 1e-5 on the loss leaves a 100x margin while a different batch, view or centre would move the
    loss by 1e-2 or more. Weights: rounding gives ~1e-8 here; an update whose sign flipped (Adam's
    first steps are ~lr * sign(grad)) would differ by about the whole movement, so the gap must stay
    below 5 % of how far the weights moved."""
    one, init = ref["weights"], ref["init"]
    assert len(losses) == len(ref["losses"]) == 6
    assert losses[1] is None and ref["losses"][1] is None  # the injected NaN step, skipped by both
    for a, b in zip(losses[:1] + losses[2:], ref["losses"][:1] + ref["losses"][2:], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    gap = max((weights[n].float() - one[n].float()).abs().max().item() for n in one)
    moved = max((weights[n].float() - init[n].float()).abs().max().item() for n in one)
    assert moved > 1e-4 and gap < 0.05 * moved, (gap, moved)


def test_two_rank_ddp_matches_one_process_and_resumes_on_one(reference, tmp_path):
    cfg = reference["cfg"]
    _wait(_torchrun(["--standalone", "--nproc_per_node", "2"], cfg, tmp_path / "ddp", tmp_path))
    weights = _rank_weights(tmp_path)
    assert not (tmp_path / "ddp" / "rank1").exists()
    expected = {"checkpoints", "config.yaml", "exported", "metrics.jsonl", "train.log"}
    if importlib.util.find_spec("tensorboard") is not None:
        expected.add("tb")  # written only when TensorBoard is installed
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == expected
    _assert_matches_single(weights, _losses(tmp_path / "ddp"), reference)

    # world size 2 -> 1: the 2-rank run's step-3 checkpoint (and its metrics up to there) resumed by
    # one process with the same global batch
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_00000003.pt"
    shutil.copy(ckpt, resumed / "checkpoints" / ckpt.name)
    shutil.copy(tmp_path / "ddp" / "metrics.jsonl", resumed / "metrics.jsonl")
    result = pretrain(cfg, resumed, resume=True)
    assert result.step == 6 and result.status == "finished"
    _assert_matches_single(result.student.state_dict(), _losses(resumed), reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_c10d_rendezvous_resume_a_one_process_run(reference, tmp_path):
    """Two launchers on localhost, ``--nnodes 2 --nproc_per_node 1`` through a c10d rendezvous (as
    two machines would run them), continue a run a single process checkpointed at step 3
    (world size 1 -> 2); the result equals the uninterrupted one-process run."""
    cfg = reference["cfg"]
    run = tmp_path / "run"
    first = pretrain({**cfg, "max_steps": 3}, run)
    assert first.step == 3 and first.status == "stopped"
    port = _free_port()
    launchers = [_torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
                            "--rdzv_id", "holons-test", "--max_restarts", "0"],
                           cfg, run, tmp_path, resume=True) for node in (0, 1)]
    _wait(*launchers)
    assert "global batch 8 on 2 rank(s)" in (run / "train.log").read_text()
    _assert_matches_single(_rank_weights(tmp_path), _losses(run), reference)
