"""Typed config: defaults < YAML < overrides, unknown keys and wrong types named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from holons.config import load_config, parse_overrides, save_config
from holons.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    method: Literal["adamv2", "dino"] = "adamv2"
    init_from: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_overrides_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\noptim:\n  lr: 0.5\n")
    cfg = load_config(Run, cfg_file, ["optim.lr=2", "method=dino"])
    assert cfg.steps == 20 and cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.method == "dino" and cfg.name == "run" and cfg.optim.betas == (0.9, 0.999)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(Run, None, ["optim.lrr=1"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(Run, cfg_file)


def test_wrong_type_and_literal_are_errors():
    with pytest.raises(ConfigError, match="steps"):
        load_config(Run, None, ["steps=abc"])
    with pytest.raises(ConfigError, match="method"):
        load_config(Run, None, ["method=mae"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["steps"])


def test_optional_and_roundtrip(tmp_path):
    cfg = load_config(Run, None, ["init_from=/x/y"])
    assert cfg.init_from == "/x/y"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg


def test_float_without_dot_is_accepted():
    assert load_config(Run, None, ["optim.lr=4e-3"]).optim.lr == 4e-3


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, "/nonexistent/config.yaml")
