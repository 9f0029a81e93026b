"""DDP on CPU (gloo, 2 processes under torchrun) against a one-process run with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import tiny_config, write_phantoms

from holons.ssl.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from holons.ssl.trainer import pretrain
cfg, out, dump = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
result = pretrain(cfg, out)
torch.save(result.student.state_dict(), os.path.join(dump, f"rank{os.environ['RANK']}.pt"))
"""


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_rank_ddp_matches_one_process(tmp_path):
    images = write_phantoms(tmp_path / "phantoms", n=16)
    # Crosses a stage change (the DDP wrapper is rebuilt with the part-whole heads trainable) and
    # skips a NaN step (no backward on any rank) so that both paths are exercised under DDP.
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 3},
              {"mode": "part_whole", "levels": [0], "steps_per_level": 3}]
    cfg = tiny_config(images, stages, debug={"nan_loss_steps": [1]})
    # Each rank draws the views of its half of the global batch from its own seeded generator;
    # view_groups=2 makes the one-process run draw exactly the same views.
    cfg["data"]["view_groups"] = 2
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(cfg), str(tmp_path / "ddp"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    assert not (tmp_path / "ddp" / "rank1").exists()
    expected = {"checkpoints", "config.yaml", "exported", "metrics.jsonl", "train.log"}
    if importlib.util.find_spec("tensorboard") is not None:
        expected.add("tb")  # written only when TensorBoard is installed
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == expected

    torch.set_num_threads(1)
    init = pretrain({**cfg, "max_steps": 0}, tmp_path / "init").student.state_dict()
    single = pretrain(cfg, tmp_path / "single")
    ddp_losses, one_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp_losses) == len(one_losses) == 6
    # Same images, same views, same initial weights; each rank's loss is the mean over its half
    # and DDP averages the gradients, which equals the gradient of the full-batch mean; the centre
    # is all-reduced (sum and count). What remains is float32 summation order (gloo all-reduce of
    # two half-batch gradients vs. one full-batch sum): relative differences of order 1e-7 per
    # operation, so 1e-5 on the loss leaves a 100x margin while a different batch, view or
    # centre would move the loss by 1e-2 or more. Weights: rounding gives ~1e-8 here; an update
    # whose sign flipped (Adam's first steps are ~lr * sign(grad)) would differ by about the
    # whole movement, so the gap must stay below 5 % of how far the weights moved.
    assert ddp_losses[1] is None and one_losses[1] is None  # the injected NaN step, skipped by both
    for a, b in zip(ddp_losses[:1] + ddp_losses[2:], one_losses[:1] + one_losses[2:], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    one = single.student.state_dict()
    gap = max((rank0[n].float() - one[n].float()).abs().max().item() for n in one)
    moved = max((rank0[n].float() - init[n].float()).abs().max().item() for n in one)
    assert moved > 1e-4 and gap < 0.05 * moved, (gap, moved)
