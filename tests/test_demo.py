"""Smoke test of `holons demo`: a miniature run (12 phantoms, tiny steps) goes end to end, writes the
report and the karyogram, prints the summary, and a rerun skips every finished step."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from holons.cli import main
from holons.cli.demo import STEP_COST, demo_steps, step_cost, time_left

torch.set_num_threads(1)


def test_demo_steps_are_cli_commands(tmp_path):
    steps = demo_steps(tmp_path / "d", n=20, seed=1)
    commands = [argv[0] for _, argv in steps]
    assert commands[:2] == ["synth", "synth"] and commands[-1] == "evaluate"
    for needed in ("index", "cache", "pretrain", "export", "karyotype"):
        assert needed in commands
    pretrain = [argv for _, argv in steps if argv[0] == "pretrain"]
    assert len(pretrain) == 2 and not any("--resume" in argv for argv in pretrain)  # new folders: fresh runs
    # a rerun resumes the run that holds a checkpoint (an interrupted one), and only that one
    (tmp_path / "d" / "runs" / "dino" / "checkpoints").mkdir(parents=True)
    (tmp_path / "d" / "runs" / "dino" / "checkpoints" / "step_00000001.pt").write_bytes(b"")
    again = {argv[argv.index("--out") + 1]: argv for _, argv in demo_steps(tmp_path / "d", n=20, seed=1)
             if argv[0] == "pretrain"}
    assert ["--resume" in argv for argv in again.values()] == [False, True]
    compare = steps[-1][1]
    assert compare[1] == "compare" and "random" in compare and "--fast" not in compare
    assert compare[compare.index("--seeds") + 1:compare.index("--seeds") + 3] == ["0", "1"]


def _cached_ids_by_split(out: Path) -> dict[str, set[str]]:
    """The phantom split of every image in the demo's pretraining cache."""
    table = pd.read_csv(out / "phantoms" / "image_table.csv", dtype=str, keep_default_na=False)
    split_of = dict(zip(table["id"], table["split"], strict=True))
    cached = pd.read_parquet(out / "cache" / "index.parquet")
    by_split: dict[str, set[str]] = {}
    for path in cached["path"]:
        image_id = Path(path).stem
        by_split.setdefault(split_of[image_id], set()).add(image_id)
    return by_split


def test_demo_pretraining_cache_holds_no_evaluation_image(tmp_path):
    """Run the fast demo's data steps (synthesize, index, cache): only train-split phantoms are cached."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "site_secret.txt").write_text("test-secret\n")
    steps = [argv for _, argv in demo_steps(out, n=12, fast=True)
             if argv[:2] == ["synth", "radiographs"] or argv[0] in ("index", "cache")]
    assert [argv[0] for argv in steps] == ["synth", "index", "cache"]
    for argv in steps:
        assert main(argv) == 0, argv
    table = pd.read_csv(out / "phantoms" / "image_table.csv", dtype=str, keep_default_na=False)
    assert {"val", "test"} <= set(table["split"])  # there are evaluation images to leak
    by_split = _cached_ids_by_split(out)
    assert set(by_split) == {"train"}, {s: sorted(ids)[:3] for s, ids in by_split.items()}
    assert by_split["train"] == set(table.loc[table["split"] == "train", "id"])  # and every train image
    cache_index = pd.read_parquet(out / "cache" / "index.parquet")
    assert set(cache_index["split"]) == {"train"}  # pretraining (data.split=train) sees all of them


def _outputs(out: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file the demo made, but its own record of finished steps."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "demo_state.json"}


@pytest.mark.slow
def test_fast_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "12", "--fast"]) == 0
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
    assert set(_cached_ids_by_split(out)) == {"train"}  # pretrained without the evaluated phantoms
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["methods"] == ["random", "dino", "adamv2"] and summary["seeds"] == [0, 1]
    # the closing lines: where the report is and the summary table of the three weight sets
    assert f"report: {report.resolve()}" in printed
    table = printed[printed.index("foundation weights"):]
    assert "corr. error px" in table and all(f"\n{m} " in table for m in ("random", "dino", "adamv2"))
    assert "karyotyping" in table

    # a rerun with the same arguments skips every finished step and rewrites none of their outputs
    made = _outputs(out)
    assert main(["demo", "--out", str(out), "--n", "12", "--fast"]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("done in an earlier run, skipped") == len(demo_steps(out, n=12, fast=True))
    assert "\n  holons " not in rerun  # no step command was printed, so none was run again
    assert _outputs(out) == made
    # other settings into the same folder are refused with one clear line
    assert main(["demo", "--out", str(out), "--n", "16", "--fast"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_demo_folder_of_an_older_layout_is_refused(tmp_path, capsys):
    """A folder of a demo that pretrained on every phantom is not resumed: its runs saw evaluation images."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "demo_state.json").write_text(json.dumps({"settings": {"n": 12, "seed": 0, "fast": True},
                                                     "done": []}))
    assert main(["demo", "--out", str(out), "--n", "12", "--fast"]) == 2
    assert "another holons version" in capsys.readouterr().err
    assert not (out / "phantoms").exists()


def test_time_left_scales_the_remaining_costs_by_the_pace_so_far():
    costs = [step_cost(argv) for _, argv in demo_steps(Path("d"))]
    assert costs[0] == STEP_COST["synth"] and max(costs) == STEP_COST["evaluate"]
    assert time_left([2.0, 20.0, 10.0], []) is None
    assert time_left([2.0, 20.0, 10.0], [None]) is None  # a skipped step is not timed
    assert time_left([2.0, 20.0, 10.0], [4.0, 40.0]) == pytest.approx(20.0)  # 2 s per unit, 10 units left
    assert time_left([2.0, 20.0, 10.0], [None, 30.0]) == pytest.approx(15.0)
