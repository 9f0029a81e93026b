"""tools/slurm_pretrain.sh builds the torchrun line from the SLURM allocation (scontrol and srun
stand-ins on PATH record what it asks for)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm_pretrain.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def _launch(tmp_path: Path, out: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake(bin_dir, "scontrol", 'printf "gpu-a17\\ngpu-a18\\ngpu-b02\\n"')
    _fake(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun_args')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "gpu-a[17-18],gpu-b02", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4",
           "CONFIG": "configs/pretrain/gpu_convnext_b.yaml", "OUT": str(out)}
    proc = subprocess.run(["bash", str(SCRIPT), "data.batch_size=96"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "srun_args").read_text().splitlines()


def test_slurm_script_rendezvous_on_the_first_node_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = _launch(tmp_path, out)
    line = " ".join(args)
    assert "--nnodes 3 --nproc_per_node 4" in line
    assert "--rdzv_backend c10d --rdzv_endpoint gpu-a17:29500" in line and "--rdzv_id 4242" in line
    assert line.endswith(f"-m holons pretrain --config configs/pretrain/gpu_convnext_b.yaml --out {out} "
                         "data.batch_size=96")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000100.pt").write_bytes(b"")
    assert "--resume" in _launch(tmp_path, out)


def test_slurm_script_needs_config_and_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "OUT")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "CONFIG" in proc.stderr
