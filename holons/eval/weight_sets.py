"""The weight sets a comparison runs: named exported foundations (or random init), their content
fingerprints, and the pretraining runs whose loss curves belong to them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holons.errors import ConfigError
from holons.eval.features import RANDOM

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class WeightSet:
    """One compared model: a name (folder-safe), its weights (exported folder or "random"), and the
    pretraining run dir whose ``metrics.jsonl`` gives its loss curves (None when unknown)."""

    name: str
    weights: str
    run_dir: Path | None = None


def recorded_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def parse_weight_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["random", "dino=runs/dino/exported", ...]`` -> ``{name: weights}``. A bare folder is named after
    the method recorded in its ``config.json`` (else the folder name); a bare ``random`` is ``random``."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            value = spec
            if spec == RANDOM:
                name = RANDOM
            else:
                folder = Path(spec)
                name = str(recorded_config(folder).get("holons", {}).get("method") or folder.resolve().name)
        if name in out:
            raise ConfigError(f"two weight sets are named {name!r}; name them NAME=DIR")
        out[name] = value
    return out


def weights_fingerprint(weights: str | Path) -> str:
    """``"random"``, or a SHA-256 prefix of the exported folder's config.json and model.safetensors."""
    if str(weights) == RANDOM:
        return RANDOM
    folder = Path(weights)
    digest = hashlib.sha256()
    try:
        for name in ("config.json", "model.safetensors"):
            with open(folder / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    except OSError as e:
        raise ConfigError(f"{folder} is not an exported foundation folder (needs model.safetensors and "
                          f"config.json), nor 'random': {e.strerror}") from e
    return digest.hexdigest()[:16]


def resolve_weight_sets(weights: Mapping[str, str | Path], runs: Mapping[str, str | Path] | None = None,
                        arch: str | None = None, with_random: bool = True) -> tuple[list[WeightSet], str]:
    """The weight sets to compare (random init first, added when missing unless ``with_random`` is False)
    and the architecture.

    The architecture is ``arch`` or the one recorded in the exported folders, which must agree (the
    comparison holds the backbone fixed). A folder ``RUN/exported`` finds its run dir by itself.
    """
    runs = dict(runs or {})
    unknown = sorted(set(runs) - set(weights))
    if unknown:
        raise ConfigError(f"--runs names {unknown[0]!r}, which is not among the --weights names")
    sets, archs = [], {}
    for name, w in weights.items():
        if not _NAME.match(name):
            raise ConfigError(f"weight set name {name!r}: use letters, digits, '_', '-' or '.'")
        w = str(w)
        run = Path(runs[name]) if name in runs else None
        if w != RANDOM:
            weights_fingerprint(w)  # a clear error for a folder that is not an export
            recorded = recorded_config(Path(w)).get("architecture")
            if recorded:
                archs[name] = str(recorded)
            parent = Path(w).resolve().parent
            if run is None and (parent / "metrics.jsonl").is_file():
                run = parent
        if run is not None and not (run / "metrics.jsonl").is_file():
            raise ConfigError(f"run dir {run} of {name!r} has no metrics.jsonl")
        sets.append(WeightSet(name, w, run))
    if not sets:
        raise ConfigError("compare needs at least one weight set")
    distinct = set(archs.values()) | ({arch} if arch else set())
    if len(distinct) > 1:
        raise ConfigError(f"the weight sets hold different architectures ({', '.join(sorted(distinct))}); "
                          "a comparison holds the backbone fixed")
    if not distinct:
        raise ConfigError("random weights need --arch NAME (a timm model, e.g. convnext_atto)")
    if with_random and not any(s.weights == RANDOM for s in sets):
        if RANDOM in weights:
            raise ConfigError("the name 'random' is kept for random init")
        sets.insert(0, WeightSet(RANDOM, RANDOM))
    sets.sort(key=lambda s: s.weights != RANDOM)  # random init first, the rest as given
    return sets, distinct.pop()

