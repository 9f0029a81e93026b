"""Studies: seed sweeps of arms run as parallel jobs, pooled over seeds, judged on a declared primary metric.

``run_study(spec_or_path, out, jobs=N, resume=...)`` (CLI ``holons study run SPEC --out DIR``) runs the
spec's setup steps, then every arm at every seed as a job (``holons.study.runner``), then writes the
record (``report_study``, CLI ``holons study report DIR``)::

    OUT/spec.yaml        the spec as run (``--set`` values applied)
    OUT/run.json         command, commit, hardware and date of the run
    OUT/<name>.json      the record: claim, command, commit, seeds, per-seed values, mean, sd, verdicts
    OUT/<name>.md        the same as a Markdown table for docs/results.md

Specs live in ``configs/studies/``; ``holons.study.spec`` documents their keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from holons.errors import HolonsError
from holons.files import atomic_write
from holons.study.pool import pool, verdict
from holons.study.record import commit, hardware, markdown, now
from holons.study.runner import read_state, run_jobs
from holons.study.spec import Job, StudySpec, expand_jobs, load_spec

__all__ = ["StudyInterrupted", "StudySpec", "load_spec", "run_study", "report_study"]


class StudyInterrupted(HolonsError):
    """The study was stopped by a signal after its running jobs stopped; rerun with ``resume`` to continue."""

    def __init__(self, signum: int, out: Path) -> None:
        super().__init__(f"stopped by signal {signum}; continue with the same command and --resume ({out})")
        self.signum = signum


def run_study(spec_or_path: str | Path | dict[str, Any], out: str | Path, *, jobs: int | None = None,
              resume: bool = False, overrides: list[str] | dict[str, Any] | None = None,
              arms: list[str] | None = None, seeds: list[int] | None = None, progress: bool | None = None,
              command: str | None = None) -> dict[str, Any]:
    """Run a study into ``out`` and return its record (also written to ``out/<name>.json`` and ``.md``).

    ``jobs``: jobs at a time (default: the spec's); ``resume``: continue a study folder (finished jobs
    are reused); ``overrides``: ``vars`` values (``NAME=VALUE``); ``arms`` / ``seeds``: a subset.
    Raises ``StudyInterrupted`` after a SIGINT / SIGTERM (the running jobs stop first).
    """
    spec = load_spec(spec_or_path, overrides)
    out = Path(out).resolve()
    previous = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if not previous.is_file():
            raise HolonsError(f"{out} is not empty and holds no study; choose another --out")
        if not resume:
            raise HolonsError(f"{out} holds a study; pass --resume to continue it or choose another --out")
        name = json.loads(previous.read_text()).get("study")
        if name != spec.name:
            raise HolonsError(f"{out} holds study {name!r}, not {spec.name!r}")
    if seeds is not None and not seeds:
        raise HolonsError("--seeds needs at least one seed")
    setup, job_list = expand_jobs(spec, out, arms=arms, seeds=seeds)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "spec.yaml", "w") as f:
        yaml.safe_dump(spec.raw, f, sort_keys=False)
    if command is None:
        given = "{...}" if isinstance(spec_or_path, dict) else repr(str(spec_or_path))
        command = f"holons.study.run_study({given}, {str(out)!r})"
    info = {"study": spec.name, "command": command, "commit": commit(), "hardware": hardware(), "date": now(),
            "jobs": jobs or spec.jobs, "threads": spec.threads, "seeds": list(seeds or spec.seeds)}
    with atomic_write(previous, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    outcome = run_jobs(Job("setup", "setup", None, setup), job_list, out, spec.metrics, spec.primary,
                       parallel=jobs or spec.jobs, threads=spec.threads, progress=progress)
    record = report_study(out)
    if outcome.signum is not None:
        raise StudyInterrupted(outcome.signum, out)
    if "setup" in outcome.failed:
        raise HolonsError(f"the setup steps failed; see {out / 'logs' / 'setup.log'}")
    return record


def report_study(out: str | Path) -> dict[str, Any]:
    """Pool the finished jobs of the study in ``out`` and write ``<name>.json`` and ``<name>.md`` there."""
    out = Path(out).resolve()
    if not (out / "spec.yaml").is_file() or not (out / "run.json").is_file():
        raise HolonsError(f"{out} holds no study (no spec.yaml / run.json)")
    spec = load_spec(yaml.safe_load((out / "spec.yaml").read_text()))
    info = json.loads((out / "run.json").read_text())
    spec.seeds = list(info.get("seeds") or spec.seeds)  # the seeds run (holons study run --seeds)
    _, jobs = expand_jobs(spec, out)
    states = [s for s in (read_state(out, j.name) for j in jobs) if s]
    pooled = pool(spec, states)
    primary = spec.metrics[spec.primary]
    seeds = sorted({int(s) for stats in pooled.values() for s in stats[spec.primary]["values"]})
    record = {
        "study": spec.name, "claim": spec.claim, "primary": {"metric": spec.primary, "goal": primary.goal},
        "command": info.get("command"), "commit": info.get("commit"), "seeds": seeds or spec.seeds,
        "date": info.get("date"), "hardware": info.get("hardware", {}), "vars": spec.vars,
        "arms": pooled,
        "verdicts": [verdict(v, pooled, spec.primary, primary.higher_is_better) for v in spec.verdicts],
        "jobs": {s["name"]: {k: s[k] for k in ("status", "seed", "wall_s", "error") if s.get(k) is not None}
                 for s in states},
    }
    from holons.eval.results import json_safe

    record = json_safe(record)
    with atomic_write(out / f"{spec.name}.json", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    with atomic_write(out / f"{spec.name}.md", "w") as f:
        f.write(markdown(record, spec))
    return record

