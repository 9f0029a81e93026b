"""Side-by-side comparison of foundation weights, written as one report folder.

``compare({"random": "random", "dino": DIR, "adamv2": DIR}, data, out)`` runs zero-shot
correspondence and few-shot segmentation (and, when asked, classification of the phantom
findings and CAM localization) for every weight set and seed, then writes::

    OUT/report.md        tables (mean ± sample standard deviation over seeds) and the plots
    OUT/summary.json     every aggregated number (mean, sd, 95 % interval, per-seed values)
    OUT/metrics.csv      one row per weight set, protocol, metric, setting and seed
    OUT/plots/*.png      bars with 95 % intervals, correspondence examples, pretraining loss
                         curves, part-whole cosine distributions
    OUT/runs/<name>/<protocol>/seed_<s>/   each protocol's own results.json and CSVs

Random init takes part (added when not given; not with ``with_random=False``). Each seed is one
evaluation run: it chooses the correspondence pairs, the few-shot support images and decoder
initialization, the classification label subsets, and the initialization of random weights. A run
whose results exist for the same weights (content hash) and settings is reused, so an interrupted
comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from holons.data.annotated import load_annotated
from holons.errors import ConfigError
from holons.eval.classify import run_classification
from holons.eval.correspondence import run_correspondence
from holons.eval.features import RANDOM, resolve_device
from holons.eval.fewshot_seg import run_fewshot_segmentation
from holons.eval.localization import run_localization
from holons.eval.report_plots import (
    LOSS_TERMS,
    PROTOCOL_TITLES,
    plot_bars,
    plot_correspondence_examples,
    plot_loss_curves,
    plot_part_whole,
    read_loss_curves,
)
from holons.eval.results import format_table, json_safe
from holons.eval.weight_sets import WeightSet, recorded_config, resolve_weight_sets, weights_fingerprint
from holons.files import atomic_write

__all__ = ["PROTOCOLS", "DEFAULT_SETTINGS", "FAST_SETTINGS", "aggregate", "compare", "format_headline"]

PROTOCOLS = ("correspondence", "fewshot-seg", "classify", "cam")
# Sized for small CPU models on the phantoms (3 weight sets x 3 seeds in about 3 minutes on 2 cores):
# matching on the last two feature stages at 128 px, one few-shot size. Larger studies pass settings.
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "correspondence": {"size": 128, "pairs": 10, "radii": (10.0, 20.0, 40.0), "random_wholes": 1,
                       "stages": 2},
    "fewshot-seg": {"shots": (6,), "modes": ("frozen",), "size": 96, "steps": 40, "batch_size": 8},
    "classify": {"protocols": ("knn", "linear"), "fractions": (0.1, 1.0), "size": 128, "n_boot": 200},
    "cam": {"size": 256},
}
FAST_SETTINGS: dict[str, dict[str, Any]] = {
    "correspondence": {"size": 64, "pairs": 3, "radii": (10.0, 20.0, 40.0), "random_wholes": 0, "stages": 1},
    "fewshot-seg": {"shots": (2,), "modes": ("frozen",), "size": 32, "steps": 3, "batch_size": 4,
                    "max_eval": 3},
    "classify": {"protocols": ("knn",), "fractions": (1.0,), "size": 32, "n_boot": 20},
    "cam": {"size": 64},
}
# Bumped when a protocol's results gain fields, so cached results made by older code are recomputed
# (correspondence 3: centred part-whole cosine and part-whole retrieval, centred per kind of whole).
RESULT_VERSIONS: dict[str, int] = {"correspondence": 3}


# --------------------------------------------------------------------------- running the protocols
def _cached_run(folder: Path, request: dict, run: Callable[[Path], dict]) -> tuple[dict, bool]:
    """Results of ``run(folder)``, reused when ``folder`` holds results made for the same ``request``."""
    request = json_safe(request)
    req_file, res_file = folder / "request.json", folder / "results.json"
    if req_file.is_file() and res_file.is_file():
        try:
            if json.loads(req_file.read_text()) == request:
                return json.loads(res_file.read_text()), True
        except ValueError:
            pass
    req_file.unlink(missing_ok=True)
    run(folder)
    with atomic_write(req_file, "w") as f:
        json.dump(request, f, indent=2)
    return json.loads(res_file.read_text()), False


def _correspondence_records(s: dict) -> list[tuple[str, str, float | None, bool]]:
    """(metric, setting, value, higher is better) rows of one correspondence result."""
    o = s["overall"]
    rows = [("mean error (px)", "all landmarks", o["mean_px"], False)]
    rows += [("mean error (px)", k, m["mean_px"], False) for k, m in s["per_structure"].items()]
    rows.append(("median error (px)", "all landmarks", o["median_px"], False))
    rows += [("PCK (%)", f"r = {k.removeprefix('pck@')} px", v, True)
             for k, v in o.items() if k.startswith("pck@")]
    for kind, m in s.get("part_whole", {}).items():
        rows.append(("part-whole cosine (median)", f"{kind} wholes", m["median"], True))
        rows.append(("part-whole cosine, centred (median)", f"{kind} wholes", m["centred_median"], True))
        rows.append(("part-whole retrieval top-1 (%)", f"{kind} wholes", 100 * m["retrieval_top1"], True))
    return rows


def _fewshot_records(s: dict) -> list[tuple[str, str, float | None, bool]]:
    rows = []
    for mode, by_n in s["dice"].items():
        for n, d in by_n.items():
            rows += [(f"Dice, {mode}, {n} shots", col, d[col]["mean"], True)
                     for col in ("heart", "lungs", "clavicles", "mean") if col in d]
    return rows


def _classify_records(s: dict) -> list[tuple[str, str, float | None, bool]]:
    rows = []
    for protocol, by_f in s["results"].items():
        for fraction, by_task in by_f.items():
            for task, m in by_task.items():
                rows.append((f"AUC, {protocol}", f"{task}, {fraction} of labels", m.get("auc"), True))
                if s.get("single_label"):
                    rows.append((f"accuracy, {protocol}", f"{task}, {fraction} of labels", m.get("accuracy"),
                                 True))
    return rows


def _cam_records(s: dict) -> list[tuple[str, str, float | None, bool]]:
    rows = []
    for task, r in s["results"].items():
        rows += [("MaxBoxAccV2 (%)", task, 100 * r["max_box_acc_v2"], True),
                 ("MaxBoxAccV2 (%)", f"{task}, data prior", 100 * r["prior"]["max_box_acc_v2"], True),
                 ("probe AUC", task, r["probe_auc"], True)]
    return rows


_RUNNERS: dict[str, tuple[Callable[..., dict], Callable[[dict], list]]] = {
    "correspondence": (run_correspondence, _correspondence_records),
    "fewshot-seg": (run_fewshot_segmentation, _fewshot_records),
    "classify": (run_classification, _classify_records),
    "cam": (run_localization, _cam_records),
}


def _protocol_kwargs(protocol: str, settings: dict, seed: int) -> dict:
    kw = dict(settings)
    if protocol in ("correspondence", "cam"):
        kw["seed"] = seed
    else:
        kw["seeds"] = (seed,)
    return kw


# --------------------------------------------------------------------------- aggregation
def aggregate(records: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per (protocol, metric, setting, method): n seeds, mean, sample sd, a t-interval of the mean
    (NaN with one seed) and the per-seed values. Undefined values (NaN) are left out. Input order is kept."""
    rows = []
    keys = ["protocol", "metric", "setting", "method"]
    for key, g in records.groupby(keys, sort=False):
        v = g["value"].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        n = len(v)
        mean = float(v.mean()) if n else math.nan
        sd = float(v.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
        rows.append({**dict(zip(keys, key, strict=True)), "n": n, "mean": mean, "sd": sd,
                     "ci_lo": mean - half, "ci_hi": mean + half,
                     "higher_is_better": bool(g["higher_is_better"].iloc[0]),
                     "per_seed": [float(x) for x in g["value"]]})
    return pd.DataFrame(rows, columns=[*keys, "n", "mean", "sd", "ci_lo", "ci_hi", "higher_is_better",
                                       "per_seed"])


# --------------------------------------------------------------------------- report
def _fmt(v: float, metric: str) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:.1f}" if "(px)" in metric or "(%)" in metric else f"{v:.3f}"


def _markdown_table(table: pd.DataFrame, protocol: str, methods: Sequence[str]) -> str:
    block = table[table["protocol"] == protocol]
    lines = ["| metric | setting | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for (metric, setting), g in block.groupby(["metric", "setting"], sort=False):
        by_m = {r["method"]: r for _, r in g.iterrows()}
        means = {m: by_m[m]["mean"] for m in methods if m in by_m and math.isfinite(by_m[m]["mean"])}
        best: set[str] = set()
        if len(means) > 1 and len({_fmt(v, metric) for v in means.values()}) > 1:
            top = (max if g["higher_is_better"].iloc[0] else min)(means.values())
            best = {m for m, v in means.items() if _fmt(v, metric) == _fmt(top, metric)}
        cells = []
        for m in methods:
            if m not in by_m or not math.isfinite(by_m[m]["mean"]):
                cells.append("-")
                continue
            r = by_m[m]
            text = _fmt(r["mean"], metric) + (f" ± {_fmt(r['sd'], metric)}" if r["n"] > 1 else "")
            cells.append(f"**{text}**" if m in best else text)
        arrow = "↑" if g["higher_is_better"].iloc[0] else "↓"
        lines.append(f"| {metric} {arrow} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_report(out: Path, info: dict, table: pd.DataFrame, plots: dict[str, Path | None],
                  sets: Sequence[WeightSet], curves: Mapping[str, pd.DataFrame]) -> Path:
    methods = [s.name for s in sets]
    seeds = info["seeds"]
    lines = [
        "# holons comparison report", "",
        f"Data: `{info['data']}`. Backbone: `{info['arch']}` for every weight set. Seeds: "
        f"{', '.join(map(str, seeds))}{' (fast settings)' if info['fast'] else ''}.",
        "Cells are the mean over seeds ± the sample standard deviation over seeds; the best mean is in bold "
        "(none when all are equal). "
        "Bars in the plots show 95 % t-intervals of the mean over seeds, dots the single seeds. "
        "Each seed draws its own image pairs, support images, label subsets and random init.", "",
        "## Weight sets", "",
        "| name | weights | method | pretraining steps | run dir |", "|---|---|---|---|---|",
    ]
    for s in sets:
        prov = recorded_config(Path(s.weights)).get("holons", {}) if s.weights != RANDOM else {}
        steps = "-"
        if s.name in curves and len(curves[s.name]):
            steps = str(int(curves[s.name]["step"].max()))
        elif "step" in prov:
            steps = str(prov["step"])
        method = prov.get("method", RANDOM if s.weights == RANDOM else "?")
        run = f"`{s.run_dir}`" if s.run_dir else "-"
        lines.append(f"| {s.name} | `{s.weights}` | {method} | {steps} | {run} |")
    for protocol in info["protocols"]:
        lines += ["", f"## {PROTOCOL_TITLES[protocol]}", ""]
        settings = info["settings"][protocol]
        lines.append("Settings: " + ", ".join(f"{k} {v}" for k, v in json_safe(settings).items()) + ".")
        if protocol == "correspondence":
            lines.append("Errors are in pixels of the images' own frame; PCK is the share of landmarks "
                         "matched within the radius.")
        if protocol == "cam":
            lines.append("A linear probe's class activation map per finding; boxes of every region above "
                         "each threshold; the best threshold per IoU 0.3 / 0.5 / 0.7, averaged "
                         "(MaxBoxAccV2). Reference: the data prior (the train positives' mean box mask, "
                         "one map for all).")
        lines += ["", _markdown_table(table, protocol, methods), ""]
        if plots.get(f"bars_{protocol}"):
            lines.append(f"![{protocol} bars](plots/{plots[f'bars_{protocol}'].name})")
        if protocol == "correspondence":
            for key, alt in (("correspondence_examples", "correspondence examples"),
                             ("part_whole", "part-whole cosines")):
                if plots.get(key):
                    lines += ["", f"![{alt}](plots/{plots[key].name})"]
    lines += ["", "## Pretraining", ""]
    if plots.get("loss_curves"):
        final = []
        for m, c in curves.items():
            if len(c):
                last = c.iloc[-1]
                final.append({"method": m, "steps": int(last["step"]),
                              **{t: float(last[t]) for t in LOSS_TERMS if t in c and pd.notna(last[t])}})
        cols = ["method", "steps", *[t for t in LOSS_TERMS if any(t in f for f in final)]]
        lines += ["Last logged value of each loss term:", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(f"{f[c]:.4f}" if isinstance(f.get(c), float) else str(f.get(c, "-"))
                                    for c in cols) + " |" for f in final]
        lines += ["", f"![loss curves](plots/{plots['loss_curves'].name})"]
    else:
        lines.append("No pretraining run dir was given (`--runs NAME=RUNDIR`), so no loss curves.")
    lines += ["", "## Files", "",
              "`summary.json` (all aggregated numbers), `metrics.csv` (one row per seed), "
              "`runs/<name>/<protocol>/seed_<s>/` (each protocol's results.json and CSVs).",
              f"Evaluation took {info['elapsed_s']:.0f} s ({info['runs_reused']} of {info['runs_total']} "
              "runs reused from an earlier call).", ""]
    path = out / "report.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines))
    return path


# --------------------------------------------------------------------------- entry point
def compare(
    weights: Mapping[str, str | Path],
    data: str | Path,
    out: str | Path,
    *,
    runs: Mapping[str, str | Path] | None = None,
    arch: str | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    protocols: Sequence[str] = ("correspondence", "fewshot-seg"),
    classify_data: str | Path | None = None,
    fast: bool = False,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    with_random: bool = True,
) -> dict:
    """Evaluate every weight set with every protocol and seed; write the report folder (see the module
    docstring) and return its summary (also in ``OUT/summary.json``).

    ``weights``: ``{name: exported folder or "random"}``; ``runs``: ``{name: pretraining run dir}`` for
    the loss curves; ``settings``: per-protocol overrides of ``DEFAULT_SETTINGS`` (``FAST_SETTINGS``
    with ``fast``); ``classify_data``: the set for ``classify`` (default ``data``); ``log``: called with
    one line per evaluation run; ``with_random=False``: only the given weight sets (a study evaluates each
    arm in its own job).
    """
    t0 = time.perf_counter()
    for p in protocols:
        if p not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    if not seeds:
        raise ConfigError("compare needs at least one seed")
    sets, arch = resolve_weight_sets(weights, runs, arch, with_random)
    out, data = Path(out), Path(data)
    load_annotated(data)  # a clear error before any work when the folder is not an annotated set
    base = FAST_SETTINGS if fast else DEFAULT_SETTINGS
    resolved = {p: {**base[p], **dict((settings or {}).get(p, {}))} for p in protocols}
    sources = {p: Path(classify_data) if p == "classify" and classify_data else data for p in protocols}
    say = log or (lambda _msg: None)

    records, points, cosines = [], {}, {}
    reused = total = 0
    for ws in sets:
        fingerprint = weights_fingerprint(ws.weights)
        for protocol in protocols:
            runner, extract = _RUNNERS[protocol]
            for seed in seeds:
                folder = out / "runs" / ws.name / protocol / f"seed_{seed}"
                request = {"protocol": protocol, "weights": fingerprint, "arch": arch, "seed": seed,
                           "data": str(sources[protocol].resolve()), "settings": resolved[protocol],
                           "device": str(resolve_device(device))}
                if protocol in RESULT_VERSIONS:
                    request["version"] = RESULT_VERSIONS[protocol]

                def run(folder: Path, runner=runner, protocol=protocol, seed=seed, ws=ws) -> dict:
                    torch.manual_seed(seed)  # random init differs per seed and repeats per seed
                    return runner(ws.weights, sources[protocol], folder, arch=arch, device=device,
                                  progress=False, **_protocol_kwargs(protocol, resolved[protocol], seed))

                t1 = time.perf_counter()
                summary, was_reused = _cached_run(folder, request, run)
                total += 1
                reused += was_reused
                say(f"  {ws.name:<10} {protocol:<15} seed {seed}: "
                    f"{'reused' if was_reused else f'{time.perf_counter() - t1:.0f} s'}")
                for metric, setting, value, higher in extract(summary):
                    records.append({"method": ws.name, "protocol": protocol, "metric": metric,
                                    "setting": setting, "seed": seed,
                                    "value": math.nan if value is None else float(value),
                                    "higher_is_better": higher})
                if protocol == "correspondence":
                    pw = folder / "part_whole.csv"
                    if pw.is_file() and pw.stat().st_size > 0:
                        frame = pd.read_csv(pw, dtype={"image": str})
                        cosines[ws.name] = pd.concat([cosines.get(ws.name), frame.assign(seed=seed)])
                    if seed == seeds[0]:
                        points[ws.name] = pd.read_csv(folder / "points.csv",
                                                      dtype={"source": str, "target": str})

    frame = pd.DataFrame(records)
    table = aggregate(frame)
    curves = {s.name: read_loss_curves(s.run_dir) for s in sets if s.run_dir is not None}
    methods = [s.name for s in sets]
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path | None] = {
        f"bars_{p}": plot_bars(table, p, methods, plot_dir / f"bars_{p}.png") for p in protocols}
    if "correspondence" in protocols:
        plots["correspondence_examples"] = plot_correspondence_examples(
            data, points, plot_dir / "correspondence_examples.png")
        plots["part_whole"] = plot_part_whole(cosines, plot_dir / "part_whole.png", methods)
    plots["loss_curves"] = plot_loss_curves(curves, plot_dir / "loss_curves.png", methods)

    info = {"data": str(data), "arch": arch, "seeds": list(seeds), "fast": fast, "protocols": list(protocols),
            "settings": resolved, "methods": methods, "elapsed_s": time.perf_counter() - t0,
            "runs_total": total, "runs_reused": reused}
    report = _write_report(out, info, table, plots, sets, curves)
    with atomic_write(out / "metrics.csv", "w") as f:
        frame.to_csv(f, index=False, float_format="%.6g", lineterminator="\n")
    summary = {
        **info, "report": str(report),
        "weights": {s.name: {"weights": s.weights, "run_dir": str(s.run_dir) if s.run_dir else None}
                    for s in sets},
        "plots": {k: str(v) for k, v in plots.items() if v is not None},
        "table": table.to_dict(orient="records"),
    }
    with atomic_write(out / "summary.json", "w") as f:
        json.dump(json_safe(summary), f, indent=2)
        f.write("\n")
    return json_safe(summary)


def _headline_keys(table: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(protocol, metric, setting, column title) of the few numbers a summary shows."""
    keys = []
    for (protocol, metric, setting), _ in table.groupby(["protocol", "metric", "setting"], sort=False):
        if protocol == "correspondence" and setting == "all landmarks" and metric == "mean error (px)":
            keys.append((protocol, metric, setting, "corr. error px ↓"))
        elif protocol == "correspondence" and metric == "PCK (%)" and setting == "r = 20 px":
            keys.append((protocol, metric, setting, "PCK@20 % ↑"))
        elif (protocol == "correspondence" and metric == "part-whole cosine, centred (median)"
              and setting == "image wholes"):
            keys.append((protocol, metric, setting, "part-whole cos (centred)"))
        elif protocol == "fewshot-seg" and setting == "mean":
            shots = metric.split(", ")[-1].removesuffix(" shots")
            mode = metric.split(", ")[1]
            title = f"Dice {shots}-shot{'' if mode == 'frozen' else ' ft'} ↑"
            keys.append((protocol, metric, setting, title))
        elif protocol == "classify" and metric.startswith("AUC") and setting.endswith(" 1 of labels"):
            keys.append((protocol, metric, setting, f"{metric.split(', ')[1]} AUC {setting.split(',')[0]} ↑"))
        elif protocol == "cam" and metric == "MaxBoxAccV2 (%)" and not setting.endswith("data prior"):
            keys.append((protocol, metric, setting, f"CAM {setting} % ↑"))
    return keys


def format_headline(summary: Mapping[str, Any]) -> str:
    """A short plain-text table (methods x headline metrics, mean ± sd over seeds) of a compare summary."""
    table = pd.DataFrame(summary["table"])
    if table.empty:
        return "(no results)"
    rows = []
    keys = _headline_keys(table)
    for m in summary["methods"]:
        row: dict[str, Any] = {"method": m}
        for protocol, metric, setting, title in keys:
            hit = table[(table["protocol"] == protocol) & (table["metric"] == metric) &
                        (table["setting"] == setting) & (table["method"] == m)]
            if hit.empty or hit["mean"].iloc[0] is None or not math.isfinite(hit["mean"].iloc[0]):
                continue
            r = hit.iloc[0]
            sd = r["sd"] if r["sd"] is not None and math.isfinite(r["sd"]) else 0.0
            row[title] = f"{_fmt(r['mean'], metric)}±{_fmt(sd, metric)}"
        rows.append(row)
    columns = [k[3] for k in keys if any(k[3] in r for r in rows)]
    return format_table(rows, ["method", *columns])
