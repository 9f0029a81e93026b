"""tools/device_bench_pretrain.sh on its CPU path (tiny sizes): the table and the JSON of issue 22's
device run (bench_pretrain.py parts b, e and f) come out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_device_bench_script_cpu_path(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "WORK": str(tmp_path / "no_study")}
    proc = subprocess.run(["bash", "tools/device_bench_pretrain.sh", "--device", "cpu", "--knobs",
                           "reference,uint8_transfer"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench_pretrain.json").read_text())
    assert res["tflops"]["flops"] > 0 and res["tflops"]["peak"]["tflops"] > 0
    assert 0 < res["tflops"]["fraction_of_peak"]
    assert res["overhead"]["full_s"] > res["overhead"]["bare_s"] > 0
    assert set(res["knobs"]) == {"reference", "uint8_transfer"}
    for variant in res["knobs"].values():
        assert variant["localizability"]["samples_per_s"] > 0 and variant["part_whole"]["samples_per_s"] > 0
    log = (tmp_path / "run.log").read_text()
    assert "samples/s of the real step" in log and "issue 22 targets" in log
