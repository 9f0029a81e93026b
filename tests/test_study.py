"""holons.study on tiny fake jobs (``python -c`` commands that write metrics): spec checks, parallel jobs,
resume, pooling and verdicts, signals passed on to the jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from holons.errors import ConfigError, HolonsError
from holons.study import StudyInterrupted, load_spec, report_study, run_study
from holons.study.pool import pool, verdict
from holons.study.spec import Verdict, expand_jobs

REPO = Path(__file__).resolve().parents[1]

# writes {"score": seed / 10 + bonus, "nested": {"loss": ...}} and counts its runs in OUT/runs.txt
WRITE = ("import json, sys; s, bonus, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]; "
         "open(out + '/runs.txt', 'a').write(sys.argv[4] + '\\n'); "
         "json.dump({'score': s / 10 + bonus, 'nested': {'loss': 1 - s / 10}}, open('metrics.json', 'w'))")


def _spec(**changes) -> dict:
    spec = {
        "name": "toy", "claim": "b scores higher than a", "primary": "score",
        "metrics": {"score": {"key": "score", "goal": "max"}, "loss": {"key": "nested/loss", "goal": "min"}},
        "seeds": [0, 1, 2], "jobs": 2, "vars": {"bonus": 0.0},
        "arms": {"a": [["python", "-c", WRITE, "{seed}", "0", "{out}", "{job}"]],
                 "b": {"vars": {"extra": "{bonus}"},
                       "steps": [["python", "-c", WRITE, "{seed}", "{extra}", "{out}", "{job}"]]}},
        "verdicts": [{"arm": "b", "beats": "a"}],
    }
    spec.update(changes)
    return spec


# --------------------------------------------------------------------------- spec
def test_a_study_without_a_primary_metric_is_refused():
    spec = _spec()
    del spec["primary"]
    with pytest.raises(ConfigError, match="no primary metric"):
        load_spec(spec)
    with pytest.raises(ConfigError, match="'nope' is not among the metrics"):
        load_spec(_spec(primary="nope"))


@pytest.mark.parametrize(("change", "named"), [
    ({"seed": [0]}, "unknown key 'seed'"),
    ({"arms": {"a": {"steps": ["true"], "step": []}}}, "arms.a: unknown key 'step'"),
    ({"metrics": {"score": {"key": "score", "goals": "max"}}}, "metrics.score: unknown key 'goals'"),
    ({"verdicts": [{"arm": "b", "beats": "c"}]}, "arm 'c'"),
    ({"verdicts": [{"arm": "b", "beats": "a", "rule": "vibes"}]}, "rule 'vibes'"),
    ({"metrics": {"score": {"key": "score", "goal": "up"}}}, "goal must be max or min"),
])
def test_unknown_keys_and_values_are_named(change, named):
    with pytest.raises(ConfigError, match=named):
        load_spec(_spec(**change))


def test_placeholders_vars_and_overrides(tmp_path):
    spec = load_spec(_spec(), ["bonus=0.5"])
    _, jobs = expand_jobs(spec, tmp_path)
    assert [j.name for j in jobs] == ["a_s0", "a_s1", "a_s2", "b_s0", "b_s1", "b_s2"]
    b1 = jobs[4].steps[0].argv
    assert b1[0] == sys.executable and b1[3:7] == ("1", "0.5", str(tmp_path.resolve()),
                                                   str(tmp_path.resolve() / "jobs" / "b_s1"))
    with pytest.raises(ConfigError, match="--set bogus: no such variable"):
        load_spec(_spec(), ["bogus=1"])
    with pytest.raises(ConfigError, match="unknown placeholder {nope}"):
        expand_jobs(load_spec(_spec(arms={"a": ["echo {nope}"]}, verdicts=[])), tmp_path)
    # a list variable splices into argvs and call arguments; a call becomes a holons.study.call argv
    call = {"call": "m:f", "args": {"xs": ["{items}", "z"], "seed": "{seed}"}}
    spec = load_spec(_spec(vars={"items": ["x", "y"]}, arms={"a": [["echo", "{items}"], call]}, verdicts=[]))
    _, (job, *_) = expand_jobs(spec, tmp_path)
    assert job.steps[0].argv == ("echo", "x", "y")
    assert job.steps[1].argv[1:4] == ("-m", "holons.study.call", "m:f")
    assert json.loads(job.steps[1].argv[4]) == {"xs": ["x", "y", "z"], "seed": 0}
    # a once arm is one job
    once = _spec(arms={"a": {"steps": ["true"], "once": True}}, verdicts=[])
    _, jobs = expand_jobs(load_spec(once), tmp_path)
    assert [j.name for j in jobs] == ["a"]


# --------------------------------------------------------------------------- pooling and verdicts
def _states(values: dict[str, list[float]]) -> list[dict]:
    return [{"arm": arm, "seed": s, "status": "done", "values": {"score": v, "loss": -v}}
            for arm, vs in values.items() for s, v in enumerate(vs)]


def test_pooling_and_the_spread_verdict():
    spec = load_spec(_spec())
    pooled = pool(spec, _states({"a": [290.0, 250.0, 300.0], "b": [270.0, 260.0, 280.0]}))
    a = pooled["a"]["score"]
    assert a["n"] == 3 and a["values"] == {0: 290.0, 1: 250.0, 2: 300.0}
    assert a["mean"] == pytest.approx(280.0) and a["sd"] == pytest.approx(26.4575, abs=1e-3)
    # lower is better on loss (= -score here): b's loss is 10 higher, a gain of -10 for b
    v = verdict(Verdict("b", "a"), pooled, "loss", higher_is_better=False)
    assert v["gain"] == pytest.approx(-10.0) and v["threshold"] == pytest.approx(26.4575, abs=1e-3)
    assert v["result"] is False
    paired = v["paired"]  # differences -20, +10, -20 for b (lower loss is better)
    assert paired["mean"] == pytest.approx(-10.0) and paired["wins"] == 1 and paired["n"] == 3
    assert paired["sd"] == pytest.approx(17.3205, abs=1e-3)
    big = verdict(Verdict("a", "b"), pool(spec, _states({"a": [400.0, 402.0, 398.0], "b": [270.0] * 3})),
                  "score", higher_is_better=True)
    assert big["gain"] == pytest.approx(130.0) and big["threshold"] == pytest.approx(2.0) and big["result"]
    one = verdict(Verdict("a", "b"), pool(spec, _states({"a": [2.0], "b": [1.0]})), "score", True)
    assert one["gain"] == 1.0 and one["result"] is None  # one seed has no spread to beat


def test_the_mean_rule_with_a_margin_and_once_arms():
    spec = load_spec(_spec(arms={"a": {"steps": ["true"], "once": True}, "b": ["true"]}))
    pooled = pool(spec, [{"arm": "a", "seed": None, "status": "done", "values": {"score": 10.0}},
                         *[{"arm": "b", "seed": s, "status": "done", "values": {"score": v}}
                           for s, v in enumerate([9.0, 9.5, 8.5])]])
    assert pooled["a"]["score"]["values"] == {0: 10.0, 1: 10.0, 2: 10.0} and pooled["a"]["score"]["sd"] == 0
    lower = verdict(Verdict("b", "a", "mean", 0.1), pooled, "score", higher_is_better=False)
    assert lower["gain"] == pytest.approx(1.0) and lower["threshold"] == pytest.approx(1.0)
    assert lower["result"] is False  # 10 % lower is needed, it is exactly 10 %
    assert verdict(Verdict("b", "a", "mean", 0.05), pooled, "score", False)["result"] is True


def test_the_noninferior_rule_allows_a_loss_up_to_the_margin():
    spec = load_spec(_spec(arms={"a": ["true"], "b": ["true"]}))
    pooled = pool(spec, _states({"a": [0.97], "b": [0.98]}))
    near = verdict(Verdict("a", "b", "noninferior", 0.02), pooled, "score", higher_is_better=True)
    assert near["gain"] == pytest.approx(-0.01) and near["threshold"] == pytest.approx(-0.0196)
    assert near["result"] is True  # one point worse, within 2 % of 0.98
    assert verdict(Verdict("a", "b", "noninferior", 0.005), pooled, "score", True)["result"] is False


# --------------------------------------------------------------------------- running
def test_a_study_runs_its_jobs_and_writes_the_record(tmp_path, capsys):
    from holons.cli import main

    out = tmp_path / "study"
    spec_file = tmp_path / "toy.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(_spec(vars={"bonus": 0.0})))
    assert main(["study", "run", str(spec_file), "--out", str(out), "--set", "bonus=1.0"]) == 0
    record = json.loads((out / "toy.json").read_text())
    assert record["primary"] == {"metric": "score", "goal": "max"} and record["seeds"] == [0, 1, 2]
    assert record["arms"]["b"]["score"]["mean"] == pytest.approx(1.1)
    assert record["arms"]["a"]["loss"]["values"] == {"0": 1.0, "1": 0.9, "2": 0.8}
    (v,) = record["verdicts"]
    assert v["result"] is True and v["gain"] == pytest.approx(1.0)
    assert record["command"].startswith("holons study run") and "bonus=1.0" in record["command"]
    for key in ("commit", "date", "hardware"):
        assert record[key]
    assert all(j["status"] == "done" for j in record["jobs"].values()) and len(record["jobs"]) == 6
    table = (out / "toy.md").read_text()
    assert "| b | 1.1 ± 0.1 |" in table and "b beats a: **yes**" in table
    assert "| b | 1.1 ± 0.1 |" in capsys.readouterr().out
    assert (out / "logs" / "a_s0.log").is_file() and (out / "jobs" / "b_s2" / "metrics.json").is_file()
    # a report of the folder gives the same record
    assert report_study(out)["arms"] == record["arms"]


def test_jobs_run_side_by_side(tmp_path):
    """Each job waits until the other has started: with jobs=2 both finish, one at a time would hang."""
    meet = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
            "other = d / sys.argv[3]; t = 0\n"
            "while not other.exists() and t < 600: time.sleep(0.05); t += 1\n"
            "assert other.exists(); open('m.json', 'w').write('{\"x\": 1}')")
    spec = _spec(metrics={"x": {"file": "m.json"}}, primary="x", seeds=[0], verdicts=[],
                 arms={"a": [["python", "-c", meet, "{out}", "a", "b"]],
                       "b": [["python", "-c", meet, "{out}", "b", "a"]]})
    record = run_study(spec, tmp_path / "s", jobs=2, progress=False)
    assert {k: j["status"] for k, j in record["jobs"].items()} == {"a_s0": "done", "b_s0": "done"}


def test_a_study_resumes_without_rerunning_finished_jobs(tmp_path):
    out = tmp_path / "s"
    flaky = ("import json, os, sys; "
             "sys.exit(3) if not os.path.exists(sys.argv[1] + '/fixed') else "
             "json.dump({'score': 5.0, 'nested': {'loss': 0.0}}, open('metrics.json', 'w'))")
    spec = _spec(arms={**_spec()["arms"], "c": [["python", "-c", flaky, "{out}"]]})
    record = run_study(spec, out, progress=False)
    status = {k: j["status"] for k, j in record["jobs"].items()}
    assert {k: v for k, v in status.items() if v != "done"} == {f"c_s{s}": "failed" for s in (0, 1, 2)}
    assert "exited with 3" in record["jobs"]["c_s1"]["error"]
    assert len((out / "runs.txt").read_text().split()) == 6
    with pytest.raises(HolonsError, match="pass --resume"):
        run_study(spec, out, progress=False)
    (out / "fixed").touch()
    record = run_study(spec, out, resume=True, progress=False)
    assert all(j["status"] == "done" for j in record["jobs"].values())
    assert len((out / "runs.txt").read_text().split()) == 6  # a and b were not run again
    assert record["arms"]["c"]["score"]["mean"] == 5.0
    changed = _spec(arms={"a": [["python", "-c", WRITE, "{seed}", "2", "{out}", "{job}"]], "b": ["true"]})
    with pytest.raises(HolonsError, match="a_s0 .* finished with other steps"):
        run_study(changed, out, resume=True, progress=False)


def test_a_signal_reaches_the_jobs_and_the_study_resumes(tmp_path):
    """SIGTERM to `holons study run` is passed on to the running job (which writes that it got it); the
    study exits 128 + 15 with the job unfinished; rerun with --resume, the job runs again and finishes."""
    wait = ("import json, pathlib, signal, sys, time\n"
            "d = pathlib.Path(sys.argv[1])\n"
            "def stop(n, f):\n    (d / 'got_signal').write_text(str(n)); sys.exit(128 + n)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "(d / 'started').touch()\n"
            "while not (d / 'go').exists(): time.sleep(0.05)\n"
            "json.dump({'score': 1.0}, open('metrics.json', 'w'))")
    import yaml

    spec_file, out = tmp_path / "wait.yaml", tmp_path / "s"
    spec_file.write_text(yaml.safe_dump(_spec(metrics={"score": {}}, seeds=[0], verdicts=[],
                                              arms={"a": [["python", "-c", wait, "{out}"]]})))
    cmd = [sys.executable, "-m", "holons", "study", "run", str(spec_file), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if (out / "started").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert (out / "started").exists(), proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert (out / "got_signal").read_text() == str(int(signal.SIGTERM)) and "--resume" in err
    state = json.loads((out / "state" / "a_s0.json").read_text())
    assert state["status"] == "interrupted" and state["steps_done"] == 0
    (out / "go").touch()
    assert subprocess.run([*cmd, "--resume"], env=env, capture_output=True).returncode == 0
    assert json.loads((out / "state" / "a_s0.json").read_text())["status"] == "done"


def test_study_interrupted_carries_the_signal(tmp_path):
    e = StudyInterrupted(15, tmp_path)
    assert e.signum == 15 and isinstance(e, HolonsError)


def test_a_missing_secondary_metric_is_left_out_and_a_missing_primary_fails_the_job(tmp_path):
    write = "import json; json.dump({'score': 1.0}, open('metrics.json', 'w'))"
    spec = _spec(metrics={"score": {}, "extra": {"key": "not/there"}}, seeds=[0], verdicts=[],
                 arms={"a": [["python", "-c", write]]})
    record = run_study(spec, tmp_path / "ok", progress=False)
    assert record["jobs"]["a_s0"]["status"] == "done"
    assert record["arms"]["a"]["score"]["mean"] == 1.0 and record["arms"]["a"]["extra"]["n"] == 0
    record = run_study({**spec, "primary": "extra"}, tmp_path / "bad", progress=False)
    assert record["jobs"]["a_s0"]["status"] == "failed" and "not/there" in record["jobs"]["a_s0"]["error"]
