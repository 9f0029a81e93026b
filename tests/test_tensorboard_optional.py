"""TensorBoard is an optional extra: asked for and missing is one warning line naming the extra."""

from __future__ import annotations

import logging
import sys
import types

import pytest
from pretrain_fixtures import tiny_config, write_phantoms

from holons.runs import TENSORBOARD_INSTALL, RunLog
from holons.ssl.trainer import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")
LOG = logging.getLogger("holons.test_tensorboard")


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Make ``from torch.utils.tensorboard import SummaryWriter`` fail as on an install without it."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # so it imports again


def _mentions(text: str) -> list[str]:
    return [line for line in text.splitlines() if TENSORBOARD_INSTALL in line]


def test_asked_for_and_missing_is_one_warning_naming_the_extra(no_tensorboard, tmp_path, capsys):
    logger = RunLog(tmp_path, LOG, tensorboard=True)
    logger.close()
    assert logger.tb is None and not (tmp_path / "tb").exists()
    said = _mentions(capsys.readouterr().err)
    assert len(said) == 1 and "not installed" in said[0] and "tensorboard=false" in said[0]
    logged = _mentions((tmp_path / "train.log").read_text())
    assert len(logged) == 1 and "WARNING" in logged[0]


@pytest.mark.parametrize("setting", [None, False])
def test_not_asked_for_stays_quiet(no_tensorboard, tmp_path, capsys, setting):
    logger = RunLog(tmp_path, LOG, tensorboard=setting)
    logger.close()
    assert logger.tb is None
    assert "tensorboard" not in capsys.readouterr().err.lower()
    assert "tensorboard" not in (tmp_path / "train.log").read_text().lower()


def test_other_ranks_and_reopened_loggers_say_nothing(no_tensorboard, tmp_path, capsys):
    RunLog(tmp_path / "rank1", LOG, active=False, tensorboard=True).close()
    RunLog(tmp_path, LOG, tensorboard=True, announce=False).close()
    assert not _mentions(capsys.readouterr().err)


def test_a_resumed_run_warns_once(no_tensorboard, tmp_path, capsys):
    """The run reopens its logger when it resumes from a checkpoint; the warning is still one line."""
    phantoms = write_phantoms(tmp_path / "phantoms", n=8)
    stages = [{"mode": "localizability", "levels": [0], "steps_per_level": 2}]
    run = tmp_path / "run"
    assert pretrain(tiny_config(phantoms, stages, tensorboard=True, max_steps=1), run).step == 1
    assert len(_mentions(capsys.readouterr().err)) == 1
    resumed = pretrain(tiny_config(phantoms, stages, tensorboard=True), run, resume=True)
    assert resumed.status == "finished" and resumed.step == 2
    assert len(_mentions(capsys.readouterr().err)) == 1
    assert not (run / "tb").exists()
    assert len(_mentions((run / "train.log").read_text())) == 2  # one per pretrain call


def test_an_installed_but_broken_tensorboard_is_said_even_when_not_asked_for(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.ModuleType("torch.utils.tensorboard"))
    logger = RunLog(tmp_path, LOG, tensorboard=None)  # the module lacks SummaryWriter: ImportError
    logger.close()
    err = capsys.readouterr().err
    assert logger.tb is None and "cannot be imported" in err and len(err.strip().splitlines()) == 1
