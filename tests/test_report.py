"""`holons evaluate compare`: the report folder renders from tiny runs (random init and a tiny
pretrained export), its numbers aggregate correctly over seeds, and a rerun reuses finished runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from pretrain_fixtures import tiny_config

from holons.cli import main
from holons.errors import ConfigError
from holons.eval.report import FAST_SETTINGS, aggregate, compare
from holons.eval.report_plots import read_loss_curves
from holons.eval.weight_sets import parse_weight_specs, resolve_weight_sets

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 phantoms of 64 px (4 patients x 3) and a 2-step convnext_atto pretraining run on them."""
    from holons.data.synthetic.radiographs import generate_radiographs
    from holons.ssl.trainer import pretrain

    tmp = tmp_path_factory.mktemp("report")
    phantoms = tmp / "phantoms"
    generate_radiographs(phantoms, n=12, seed=3, size=64, formats=("png",), workers=1, progress=False)
    stages = [{"mode": "part_whole", "levels": [0], "steps_per_level": 2}]
    cfg = tiny_config(phantoms / "images", stages, data={"batch_size": 4})
    pretrain(cfg, tmp / "run", progress=False)
    return phantoms, tmp / "run"


def test_aggregate_mean_sd_and_t_interval():
    records = pd.DataFrame({
        "method": ["a", "a", "a", "b"], "protocol": ["p"] * 4, "metric": ["m"] * 4, "setting": ["s"] * 4,
        "seed": [0, 1, 2, 0], "value": [1.0, 2.0, 6.0, 4.0], "higher_is_better": [True] * 4,
    })
    table = aggregate(records).set_index("method")
    a = table.loc["a"]
    assert a["n"] == 3 and a["mean"] == pytest.approx(3.0)
    assert a["sd"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    half = 4.302652729911275 * a["sd"] / math.sqrt(3)  # t(0.975, df=2)
    assert a["ci_lo"] == pytest.approx(3.0 - half) and a["ci_hi"] == pytest.approx(3.0 + half)
    b = table.loc["b"]  # one seed: no spread, no interval
    assert b["sd"] == 0.0 and math.isnan(b["ci_lo"]) and b["per_seed"] == [4.0]


def test_weight_specs_and_errors(tiny, tmp_path):
    _, run = tiny
    exported = str(run / "exported")
    assert parse_weight_specs(["random", f"x={exported}"]) == {"random": "random", "x": exported}
    assert parse_weight_specs([str(run / "exported")]) == {"adamv2": str(run / "exported")}  # recorded method
    with pytest.raises(ConfigError, match="two weight sets"):
        parse_weight_specs(["a=random", "a=random"])
    sets, arch = resolve_weight_sets({"pre": str(run / "exported")})
    assert arch == "convnext_atto" and [s.name for s in sets] == ["random", "pre"]
    assert sets[1].run_dir == (run).resolve()  # RUN/exported finds its run dir
    with pytest.raises(ConfigError, match="different architectures"):
        resolve_weight_sets({"pre": str(run / "exported")}, arch="resnet10t")
    with pytest.raises(ConfigError, match="--arch"):
        resolve_weight_sets({"r": "random"})
    with pytest.raises(ConfigError, match="not an exported foundation folder"):
        resolve_weight_sets({"bad": str(tmp_path)}, arch="resnet10t")


def test_read_loss_curves_skips_a_cut_line(tmp_path):
    lines = [json.dumps({"step": 5, "loss": 3.0, "loss_loc": 2.0}), json.dumps({"step": 10, "loss": 2.5}),
             '{"step": 15, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    curves = read_loss_curves(tmp_path)
    assert curves["step"].tolist() == [5, 10] and curves["loss"].tolist() == [3.0, 2.5]
    assert np.isnan(curves["loss_loc"].iloc[1])


@pytest.mark.slow
def test_compare_report_renders_and_reruns_reuse(tiny, tmp_path, capsys):
    phantoms, run = tiny
    out = tmp_path / "report"
    summary = compare({"adamv2": run / "exported"}, phantoms, out, seeds=(0, 1), fast=True)
    assert summary["methods"] == ["random", "adamv2"] and summary["runs_total"] == 2 * 2 * 2
    # fast means the miniature settings: their work is bounded by sizes and step counts, not a clock
    assert summary["fast"] and summary["settings"] == json.loads(json.dumps(
        {p: FAST_SETTINGS[p] for p in ("correspondence", "fewshot-seg")}))

    text = (out / "report.md").read_text()
    for heading in ("## Weight sets", "## Zero-shot landmark correspondence", "## Few-shot segmentation",
                    "## Pretraining"):
        assert heading in text
    assert "| metric | setting | random | adamv2 |" in text
    assert "| mean error (px) ↓ | all landmarks |" in text and "| Dice, frozen, 2 shots ↑ | heart |" in text
    assert "**" in text  # the best mean of a row is bold
    for name in ("bars_correspondence", "bars_fewshot-seg", "correspondence_examples", "part_whole",
                 "loss_curves"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"(plots/{name}.png)" in text

    # the table's numbers are the per-seed values of the protocols' own results files
    table = pd.DataFrame(summary["table"])
    row = table[(table["method"] == "adamv2") & (table["metric"] == "mean error (px)")
                & (table["setting"] == "all landmarks")].iloc[0]
    per_seed = [json.loads((out / "runs" / "adamv2" / "correspondence" / f"seed_{s}" / "results.json")
                           .read_text())["overall"]["mean_px"] for s in (0, 1)]
    assert row["per_seed"] == pytest.approx(per_seed) and row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    long = pd.read_csv(out / "metrics.csv")
    assert set(long["method"]) == {"random", "adamv2"} and set(long["seed"]) == {0, 1}
    # random init differs per seed (each seed seeds the initialization)
    rnd = long[(long["method"] == "random") & (long["metric"] == "mean error (px)")
               & (long["setting"] == "all landmarks")]["value"]
    assert rnd.nunique() == 2

    # the CLI into the same folder reuses every run; the loss curves come from the named run dir
    rc = main(["evaluate", "compare", "--weights", "random", f"adamv2={run / 'exported'}",
               "--runs", f"adamv2={run}", "--data", str(phantoms), "--out", str(out), "--seeds", "0", "1",
               "--fast", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reused" in printed and "corr. error px" in printed and str(out / "report.md") in printed
    again = json.loads((out / "summary.json").read_text())
    assert again["runs_reused"] == again["runs_total"] == 8


def test_cli_compare_bad_input(tiny, tmp_path, capsys):
    phantoms, _ = tiny
    rc = main(["evaluate", "compare", "--weights", "random", "--data", str(phantoms), "--out", str(tmp_path)])
    assert rc == 2 and "--arch" in capsys.readouterr().err
    rc = main(["evaluate", "compare", "--weights", "random", "--arch", "resnet10t", "--runs", "nope",
               "--data", str(phantoms), "--out", str(tmp_path)])
    assert rc == 2 and "NAME=RUNDIR" in capsys.readouterr().err
