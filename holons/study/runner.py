"""The job runner of a study: N jobs at a time, one log per job, signals passed on, resume by job.

Layout of the study folder::

    OUT/jobs/<job>/      the job's own folder (``{job}`` in the spec): what its steps write
    OUT/logs/<job>.log   its steps' stdout and stderr (``setup.log`` for the setup steps)
    OUT/state/<job>.json status (done / failed / interrupted), steps finished, seconds, metric values

Every step is a child process in its own session, so a terminal's Ctrl-C reaches it once, passed on
from here: SIGINT / SIGTERM go to every running child (a second one kills them), no new step starts,
and the study exits with 128 + the signal once the children have stopped (a pretraining run writes its
checkpoint first). Run it again with resume and finished jobs are not rerun; an unfinished job skips its
finished steps and reruns the one that was stopped (the API steps of ``holons.study.steps`` continue
from their checkpoints; a plain command is run again from its start). A finished job is reused only
when its resolved steps are the same (a changed spec is refused rather than mixed in).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holons.errors import HolonsError
from holons.files import atomic_write
from holons.study.spec import REPO, Job, Metric

__all__ = ["RunOutcome", "run_jobs", "read_state", "job_values"]


@dataclass
class RunOutcome:
    """What a call of ``run_jobs`` did: job names per status and the signal that stopped it (if any)."""

    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    signum: int | None = None


def read_state(out: Path, name: str) -> dict[str, Any]:
    """The saved state of job ``name`` (empty when it never started)."""
    path = out / "state" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(out: Path, name: str, state: dict[str, Any]) -> None:
    with atomic_write(out / "state" / f"{name}.json", "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(part)
        tree = tree[part]
    return tree


def job_values(folder: Path, metrics: dict[str, Metric], primary: str) -> dict[str, float | None]:
    """Each metric's number, read from the job folder's JSON files: None for a secondary metric the job did
    not write (e.g. a few-shot size a smaller run leaves out); ``HolonsError`` when the primary is missing."""
    values: dict[str, float | None] = {}
    files: dict[str, Any] = {}
    for m in metrics.values():
        path = folder / m.file
        try:
            if m.file not in files:
                try:
                    files[m.file] = json.loads(path.read_text())
                except (OSError, ValueError) as e:
                    raise HolonsError(f"metric {m.name}: cannot read {path}: {e}") from e
            try:
                v = _lookup(files[m.file], m.key)
            except KeyError as e:
                raise HolonsError(f"metric {m.name}: {path} has no key {m.key!r} (missing {e})") from e
        except HolonsError:
            if m.name == primary:
                raise
            v = None
        values[m.name] = None if v is None else float(v)
    return values


class _Children:
    """The running child processes; a signal is passed on to each one's process group."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None
        self.forced = False

    def handle(self, signum: int, _frame: Any) -> None:
        again = self.signum is not None
        self.signum = self.signum or signum
        self.forced = again
        with self.lock:
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL if again else signum)
                    except ProcessLookupError:
                        pass


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")  # children import this holons
    return env


def _run_one(job: Job, out: Path, metrics: dict[str, Metric], primary: str, children: _Children,
             env: dict[str, str]) -> str:
    """Run (or reuse, or continue) one job; returns its status: done, reused, failed or interrupted."""
    state = read_state(out, job.name)
    fp = job.fingerprint()
    if state.get("fingerprint") != fp:
        state = {}  # an unfinished job of another spec starts over (a finished one was refused before)
    if state.get("status") == "done":
        return "reused"
    folder = out / "jobs" / job.name
    folder.mkdir(parents=True, exist_ok=True)
    first = int(state.get("steps_done", 0))
    state = {"name": job.name, "arm": job.arm, "seed": job.seed, "fingerprint": fp, "status": "running",
             "steps_done": first, "steps": [" ".join(s.argv) for s in job.steps],
             "wall_s": float(state.get("wall_s", 0.0))}
    _write_state(out, job.name, state)
    log_path = out / "logs" / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(first, len(job.steps)):
        step = job.steps[k]
        if children.signum is not None:
            state["status"] = "interrupted"
            break
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n=== step {k + 1}/{len(job.steps)} ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
                      f"{' '.join(step.argv)}\n")
            log.flush()
            with children.lock:
                if children.signum is not None:
                    state["status"] = "interrupted"
                    break
                proc = subprocess.Popen(step.argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                children.procs.add(proc)
            rc = proc.wait()
            with children.lock:
                children.procs.discard(proc)
            log.write(f"=== exit {rc} after {time.perf_counter() - t0:.1f} s\n")
        state["wall_s"] = round(state["wall_s"] + time.perf_counter() - t0, 1)
        if rc != 0:
            state["status"] = "interrupted" if children.signum is not None else "failed"
            state["error"] = f"step {k + 1} ({step.title}) exited with {rc}; see {log_path}"
            break
        state["steps_done"] = k + 1
        _write_state(out, job.name, state)
    else:
        try:
            state["values"] = job_values(folder, metrics, primary) if metrics else {}
            state["status"] = "done"
        except HolonsError as e:
            state["status"], state["error"] = "failed", str(e)
    _write_state(out, job.name, state)
    return state["status"]


def run_jobs(setup: Job | None, jobs: list[Job], out: Path, metrics: dict[str, Metric], primary: str, *,
             parallel: int, threads: int, progress: bool | None = None) -> RunOutcome:
    """Run ``setup`` (once, first), then ``jobs``, ``parallel`` at a time; see the module docstring."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    outcome = RunOutcome()
    children = _Children()
    env = _child_env(threads)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, children.handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        if setup is not None and setup.steps:
            status = _run_one(setup, out, {}, "", children, env)
            if status in ("failed", "interrupted"):
                getattr(outcome, status).append(setup.name)
                outcome.signum = children.signum
                return outcome
        todo = []
        for j in jobs:
            state = read_state(out, j.name)
            if state.get("status") != "done":
                todo.append(j)
            elif state.get("fingerprint") != j.fingerprint():
                raise HolonsError(f"job {j.name} in {out} finished with other steps (the spec or --set "
                                  "values changed); remove its state and folder, or choose another --out")
            else:
                outcome.reused.append(j.name)
        bar = tqdm(total=len(jobs), initial=len(outcome.reused), desc="jobs", unit="job",
                   disable=progress is False, dynamic_ncols=True)
        with bar, ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            pending = {pool.submit(_run_one, j, out, metrics, primary, children, env): j for j in todo}
            while pending:
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = pending.pop(fut)
                    status = fut.result()
                    getattr(outcome, status).append(job.name)
                    bar.update(1)
                    left = len(jobs) - bar.n
                    bar.set_postfix_str(f"{job.name} {status}; {left} left")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    outcome.signum = children.signum
    return outcome
