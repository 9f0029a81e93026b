"""Smoke test of `holons demo`: a miniature run (12 phantoms, tiny steps) goes end to end, writes the
report and the karyogram, prints the summary, and a rerun skips every finished step."""

from __future__ import annotations

import json
import time

import torch

from holons.cli import demo_steps, main

torch.set_num_threads(1)


def test_demo_steps_are_cli_commands(tmp_path):
    steps = demo_steps(tmp_path / "d", n=20, seed=1)
    commands = [argv[0] for _, argv in steps]
    assert commands[:2] == ["synth", "synth"] and commands[-1] == "evaluate"
    for needed in ("index", "cache", "pretrain", "export", "karyotype"):
        assert needed in commands
    pretrain = [argv for _, argv in steps if argv[0] == "pretrain"]
    assert len(pretrain) == 2 and all("resume=true" in argv for argv in pretrain)  # reruns resume
    compare = steps[-1][1]
    assert compare[1] == "compare" and "random" in compare and "--fast" not in compare
    assert compare[compare.index("--seeds") + 1:compare.index("--seeds") + 4] == ["0", "1", "2"]


def test_fast_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(out), "--n", "12", "--fast"]) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out

    report = out / "report" / "report.md"
    text = report.read_text()
    assert "| metric | setting | random | dino | adamv2 |" in text
    plots = ("bars_correspondence", "bars_fewshot-seg", "correspondence_examples", "loss_curves",
             "part_whole")
    for png in plots:
        assert (out / "report" / "plots" / f"{png}.png").stat().st_size > 5000, png
    assert (out / "karyotype" / "karyogram_syn00000.01.png").stat().st_size > 5000
    assert (out / "karyotype" / "predictions" / "predictions.csv").is_file()
    for method in ("adamv2", "dino"):
        assert (out / "weights" / method / "model.safetensors").is_file()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["methods"] == ["random", "dino", "adamv2"] and summary["seeds"] == [0, 1]
    # the closing lines: where the report is and the summary table of the three weight sets
    assert f"report: {report.resolve()}" in printed
    table = printed[printed.index("foundation weights"):]
    assert "corr. error px" in table and all(f"\n{m} " in table for m in ("random", "dino", "adamv2"))
    assert "karyotyping" in table

    # a rerun with the same arguments skips every finished step
    t1 = time.perf_counter()
    assert main(["demo", "--out", str(out), "--n", "12", "--fast"]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("done in an earlier run, skipped") == len(demo_steps(out, n=12, fast=True))
    assert time.perf_counter() - t1 < max(10.0, first / 5)
    # other settings into the same folder are refused with one clear line
    assert main(["demo", "--out", str(out), "--n", "16", "--fast"]) == 2
    assert "other settings" in capsys.readouterr().err
