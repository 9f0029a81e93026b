"""The README's Python quickstart runs as written, through the public API (``import holons``), on the
phantoms its command-line quickstart makes (fewer of them here, to keep the test short)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from holons.cli import main

REPO = Path(__file__).resolve().parents[1]


def readme_python_quickstart() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart: Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_public_api_names_what_the_readme_promises():
    import holons

    for name in ("index", "cache", "pretrain", "export", "finetune", "predict", "evaluate", "karyotype"):
        assert getattr(holons, name) is not None
    assert callable(holons.finetune.classify) and callable(holons.finetune.segment)
    assert callable(holons.karyotype.train) and callable(holons.evaluate.correspondence)
    with pytest.raises(AttributeError):
        holons.no_such_thing  # noqa: B018


@pytest.mark.slow
def test_readme_python_quickstart_runs_as_written(tmp_path):
    code = readme_python_quickstart()
    assert "import holons" in code and len(code.strip().splitlines()) <= 14
    for out, n, seed in (("data/phantoms", "60", "0"), ("data/phantoms_new", "4", "1")):
        assert main(["synth", "radiographs", "--out", str(tmp_path / out), "--n", n, "--seed", seed,
                     "--size", "64"]) == 0
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "quickstart.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    masks = sorted((tmp_path / "predictions").rglob("*.nii.gz"))
    assert len(masks) == 4
    assert (tmp_path / "weights" / "adamv2" / "model.safetensors").is_file()
