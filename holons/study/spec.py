"""The study spec: a YAML file that declares a seed sweep of arms, its primary metric and its verdicts.

A study answers one question ("does adamv2 beat dino on landmark error?") with several arms (ways of
making a model), each run once per seed as a *job*: a list of steps, each a command or an API call,
in its own folder. Example::

    name: demo
    claim: arm b has a lower error than arm a      # what the study is meant to show
    primary: error                                 # required: the metric the verdicts use
    metrics:                                       # name: where each job's number is read
      error: {key: overall/mean_px, goal: min}     # file defaults to metrics_file
    metrics_file: eval/results.json                # relative to the job folder
    seeds: [0, 1, 2]
    jobs: 2                                        # jobs at a time (holons study run --jobs)
    threads: 1                                     # OMP / torch threads of each job
    vars: {steps: 240}                             # {steps} in steps; holons study run --set steps=10
    setup:                                         # run once before the arms (shared data)
      - holons synth radiographs --out {out}/phantoms --n 24
    arms:
      a: ["holons evaluate correspondence --weights random --arch convnext_atto --init-seed {seed} ..."]
      b:
        vars: {lr: 1.0e-3}
        steps:
          - {call: "holons.study.steps:pretrain_for_steps", args: {config: ..., seed: "{seed}"}}
    verdicts:
      - {arm: b, beats: a}                         # rule spread (default), mean or noninferior

Steps: a string (split like a shell would, without one), an argv list, ``{run: ...}`` or
``{call: "module:function", args: {...}}`` (run in a child process by ``holons.study.call``). An argv
starting with ``holons`` or ``python`` runs with this Python. Placeholders ``{name}`` are replaced by
the job's values (``seed``, ``arm``, ``job`` its folder, ``out`` the study folder, ``threads``,
``python``, ``repo`` the folder holding the ``holons`` package, ``data`` the shared data folder:
``$HOLONS_DATA``, else ``../shared/data``, else the literal text ``$HOLONS_DATA`` so that a step using it
fails naming it) and by ``vars``; an argv item that is
exactly ``{name}`` of a list variable becomes the list's items (in argvs and in call arguments). An
unknown key or placeholder is named in the error.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from holons.errors import ConfigError
from holons.files import shared_data_root

__all__ = ["Step", "Job", "Metric", "Verdict", "StudySpec", "load_spec", "expand_jobs", "REPO"]

REPO = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = {"name", "claim", "description", "primary", "metrics", "metrics_file", "seeds", "jobs", "threads",
             "vars", "setup", "arms", "verdicts"}
_ARM_KEYS = {"steps", "vars", "once"}
_METRIC_KEYS = {"key", "file", "goal"}
_VERDICT_KEYS = {"arm", "beats", "rule", "margin"}
RULES = ("spread", "mean", "noninferior")
"""``spread``: the arm's mean is better by more than the larger of the two seed sds (undecided with
one seed); ``mean``: better by more than ``margin`` (a fraction of the other arm's mean, default 0);
``noninferior``: not worse by more than ``margin`` (the same fraction), e.g. "within 2 % of the reference"."""


@dataclass(frozen=True)
class Metric:
    """One number per job: ``key`` (``a/b/c``: nested keys) in the JSON file ``file`` of the job folder."""

    name: str
    key: str
    file: str
    goal: str  # "max" or "min"

    @property
    def higher_is_better(self) -> bool:
        return self.goal == "max"


@dataclass(frozen=True)
class Verdict:
    """``arm`` beats ``beats`` on the primary metric under ``rule`` (see ``RULES``)."""

    arm: str
    beats: str
    rule: str = "spread"
    margin: float = 0.0


@dataclass(frozen=True)
class Step:
    """One resolved step: an argv to run (API calls are already turned into a ``holons.study.call`` argv)."""

    argv: tuple[str, ...]
    title: str


@dataclass(frozen=True)
class Job:
    """One arm at one seed (``once`` arms: one job whose numbers stand for every seed)."""

    name: str
    arm: str
    seed: int | None
    steps: tuple[Step, ...]

    def fingerprint(self) -> str:
        """A hash of the resolved steps: a finished job is reused only for the same steps."""
        text = json.dumps([list(s.argv) for s in self.steps])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StudySpec:
    """A validated study spec (see the module docstring); ``raw`` is the mapping it was read from."""

    name: str
    primary: str
    metrics: dict[str, Metric]
    arms: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0])
    jobs: int = 1
    threads: int = 1
    vars: dict[str, Any] = field(default_factory=dict)
    setup: list[Any] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    claim: str = ""
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def _unknown(keys: set[str], allowed: set[str], where: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def load_spec(spec: str | Path | dict[str, Any],
              overrides: list[str] | dict[str, Any] | None = None) -> StudySpec:
    """Read and check a spec (a YAML path or a mapping); ``overrides`` (``NAME=VALUE`` strings or a
    mapping, YAML values) replace ``vars`` entries, which must exist. Raises ``ConfigError``."""
    if isinstance(spec, dict):
        raw, where = dict(spec), "study spec"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"study spec not found: {path}")
        raw, where = yaml.safe_load(path.read_text()) or {}, str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
    _unknown(set(raw), _TOP_KEYS, where)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: 'name' is required (letters, digits, '_', '-', '.')")
    if not raw.get("primary"):
        raise ConfigError(f"{where}: no primary metric declared ('primary: METRIC'); a study states which "
                          "number its verdict rests on before it runs")
    metrics = _metrics(raw, where)
    primary = str(raw["primary"])
    if primary not in metrics:
        raise ConfigError(f"{where}: primary metric {primary!r} is not among the metrics "
                          f"({', '.join(metrics)})")
    arms = _arms(raw.get("arms"), where)
    variables = dict(raw.get("vars") or {})
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected NAME=VALUE")
            pairs.append((key.strip(), _parse_value(value)))
    for key, value in pairs:
        if key not in variables:
            raise ConfigError(f"{where}: --set {key}: no such variable; "
                              f"vars: {', '.join(variables) or 'none'}")
        variables[key] = value
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers")
    jobs, threads = raw.get("jobs", 1), raw.get("threads", 1)
    if not (isinstance(jobs, int) and jobs >= 1 and isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"{where}: 'jobs' and 'threads' must be integers >= 1")
    verdicts = []
    for i, v in enumerate(raw.get("verdicts") or []):
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: verdicts[{i}] must be a mapping (arm, beats, rule, margin)")
        _unknown(set(v), _VERDICT_KEYS, f"{where}: verdicts[{i}]")
        verdict = Verdict(str(v.get("arm")), str(v.get("beats")), str(v.get("rule", "spread")),
                          float(v.get("margin", 0.0)))
        for arm in (verdict.arm, verdict.beats):
            if arm not in arms:
                raise ConfigError(f"{where}: verdicts[{i}] names arm {arm!r}, not among {', '.join(arms)}")
        if verdict.rule not in RULES:
            raise ConfigError(f"{where}: verdicts[{i}]: rule {verdict.rule!r} is not one of {list(RULES)}")
        verdicts.append(verdict)
    return StudySpec(name=name, primary=primary, metrics=metrics, arms=arms, seeds=list(seeds), jobs=jobs,
                     threads=threads, vars=variables, setup=list(raw.get("setup") or []), verdicts=verdicts,
                     claim=str(raw.get("claim", "")), description=str(raw.get("description", "")),
                     raw={**raw, "vars": variables})


def _metrics(raw: dict[str, Any], where: str) -> dict[str, Metric]:
    default_file = str(raw.get("metrics_file", "metrics.json"))
    given = raw.get("metrics")
    if not isinstance(given, dict) or not given:
        raise ConfigError(f"{where}: 'metrics' must map metric names to {{key, goal[, file]}}")
    out = {}
    for name, m in given.items():
        if isinstance(m, str):
            m = {"key": m}
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: metrics.{name}: expected a mapping {{key, goal[, file]}}")
        _unknown(set(m), _METRIC_KEYS, f"{where}: metrics.{name}")
        goal = m.get("goal", "max")
        if goal not in ("max", "min"):
            raise ConfigError(f"{where}: metrics.{name}: goal must be max or min, got {goal!r}")
        out[str(name)] = Metric(str(name), str(m.get("key", name)), str(m.get("file", default_file)), goal)
    return out


def _arms(given: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(given, dict) or not given:
        raise ConfigError(f"{where}: 'arms' must map arm names to their steps")
    arms = {}
    for name, arm in given.items():
        if not _NAME.match(str(name)):
            raise ConfigError(f"{where}: arm name {name!r}: use letters, digits, '_', '-' or '.'")
        if isinstance(arm, list):
            arm = {"steps": arm}
        if not isinstance(arm, dict):
            raise ConfigError(f"{where}: arms.{name}: expected a list of steps or a mapping with 'steps'")
        _unknown(set(arm), _ARM_KEYS, f"{where}: arms.{name}")
        if not arm.get("steps"):
            raise ConfigError(f"{where}: arms.{name} has no steps")
        arms[str(name)] = {"steps": list(arm["steps"]), "vars": dict(arm.get("vars") or {}),
                           "once": bool(arm.get("once", False))}
    return arms


# --------------------------------------------------------------------------- resolving jobs
def _fill(value: Any, values: dict[str, Any], where: str) -> Any:
    """``value`` with every ``{name}`` placeholder replaced (recursively in lists and mappings)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole and whole.group(1) in values and not isinstance(values[whole.group(1)], str):
            return values[whole.group(1)]  # keep the type: {seed} -> 0, {sets} -> a list

        def one(m: re.Match) -> str:
            if m.group(1) not in values:
                raise ConfigError(f"{where}: unknown placeholder {{{m.group(1)}}}; "
                                  f"known: {', '.join(sorted(values))}")
            v = values[m.group(1)]
            return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)

        return _PLACEHOLDER.sub(one, value)
    if isinstance(value, list):  # an item "{name}" of a list variable becomes the list's items
        out: list[Any] = []
        for v in value:
            filled = _fill(v, values, where)
            spliced = isinstance(v, str) and _PLACEHOLDER.fullmatch(v) and isinstance(filled, list)
            out.extend(filled) if spliced else out.append(filled)
        return out
    if isinstance(value, dict):
        return {k: _fill(v, values, where) for k, v in value.items()}
    return value


def _argv(items: list[Any], values: dict[str, Any], where: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        filled = _fill(item, values, where) if isinstance(item, str) else item
        out.extend(str(x) for x in filled) if isinstance(filled, list) else out.append(str(filled))
    if not out:
        raise ConfigError(f"{where}: empty command")
    if out[0] == "holons":
        return (sys.executable, "-m", "holons", *out[1:])
    if out[0] in ("python", "python3"):
        return (sys.executable, *out[1:])
    return tuple(out)


def resolve_step(step: Any, values: dict[str, Any], where: str) -> Step:
    """One spec step as an argv (see the module docstring for the forms a step takes)."""
    if isinstance(step, dict):
        _unknown(set(step), {"run", "call", "args"}, where)
        if "call" in step:
            target = str(step["call"])
            if ":" not in target:
                raise ConfigError(f"{where}: call {target!r}: expected 'module:function'")
            args = _fill(dict(step.get("args") or {}), values, where)
            return Step((sys.executable, "-m", "holons.study.call", target, json.dumps(args)), target)
        step = step.get("run")
    if isinstance(step, str):
        step = shlex.split(step)
    if not isinstance(step, list):
        raise ConfigError(f"{where}: a step is a command string, an argv list, {{run: ...}} or {{call: ...}}")
    argv = _argv(step, values, where)
    is_holons = argv[:3] == (sys.executable, "-m", "holons")
    return Step(argv, " ".join(argv[2:4]) if is_holons else Path(argv[0]).name)


def base_values(spec: StudySpec, out: Path) -> dict[str, Any]:
    """The placeholders every step knows, before the arm's and seed's own (``vars`` may use the
    built-in ones, e.g. ``{repo}/configs/...``)."""
    root = shared_data_root()
    builtin = {"out": str(out), "threads": spec.threads, "python": sys.executable, "repo": str(REPO),
               "data": str(root) if root is not None else "$HOLONS_DATA"}
    return {**_fill(spec.vars, {**spec.vars, **builtin}, "vars"), **builtin}


def expand_jobs(spec: StudySpec, out: str | Path, *, arms: list[str] | None = None,
                seeds: list[int] | None = None) -> tuple[tuple[Step, ...], list[Job]]:
    """The setup steps and the jobs (arm by arm, seed by seed) of ``spec`` run in ``out``."""
    out = Path(out).resolve()
    for a in arms or []:
        if a not in spec.arms:
            raise ConfigError(f"unknown arm {a!r}; the study has {', '.join(spec.arms)}")
    values = base_values(spec, out)
    setup = tuple(resolve_step(s, {**values, "job": str(out / "setup")}, f"setup[{i}]")
                  for i, s in enumerate(spec.setup))
    jobs = []
    for name, arm in spec.arms.items():
        if arms and name not in arms:
            continue
        for seed in ([None] if arm["once"] else list(seeds or spec.seeds)):
            job = name if seed is None else f"{name}_s{seed}"
            v = {**values, "arm": name, "seed": spec.seeds[0] if seed is None else seed,
                 "job": str(out / "jobs" / job)}
            v.update(_fill(arm["vars"], v, f"arms.{name}.vars"))
            steps = tuple(resolve_step(s, v, f"arms.{name}.steps[{i}]") for i, s in enumerate(arm["steps"]))
            jobs.append(Job(job, name, seed, steps))
    return setup, jobs
