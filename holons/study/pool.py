"""Pooling over seeds (mean ± sample sd per arm and metric) and the verdicts on the primary metric."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from holons.study.spec import StudySpec, Verdict

__all__ = ["pool", "verdict", "paired"]


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {"n": int(len(arr)), "mean": float(arr.mean()) if len(arr) else math.nan,
            "sd": float(arr.std(ddof=1)) if len(arr) > 1 else math.nan}


def pool(spec: StudySpec, states: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{arm: {metric: {n, mean, sd, values: {seed: value}}}}`` over the finished jobs in ``states``.

    A ``once`` arm's single job stands for every seed of the study (its sd is then 0), so that it
    pairs with the seeded arms like a result that does not depend on the seed. Undefined values
    (None, NaN) are left out of the mean and sd.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for arm, cfg in spec.arms.items():
        done = [s for s in states if s.get("arm") == arm and s.get("status") == "done"]
        if not done:
            continue
        out[arm] = {}
        for metric in spec.metrics:
            per_seed: dict[int, float] = {}
            for s in done:
                v = s.get("values", {}).get(metric)
                if v is None or not math.isfinite(v):
                    continue
                for seed in (spec.seeds if cfg["once"] else [s["seed"]]):
                    per_seed[int(seed)] = float(v)
            per_seed = dict(sorted(per_seed.items()))
            out[arm][metric] = {**_stats(list(per_seed.values())), "values": per_seed}
    return out


def paired(a: dict[str, Any], b: dict[str, Any], higher_is_better: bool) -> dict[str, Any]:
    """``a`` minus ``b`` seed by seed (signed so that positive means ``a`` is better): mean, sd, wins, n."""
    sign = 1.0 if higher_is_better else -1.0
    seeds = sorted(set(a["values"]) & set(b["values"]))
    d = [sign * (a["values"][s] - b["values"][s]) for s in seeds]
    return {**_stats(d), "wins": int(sum(x > 0 for x in d))}


def verdict(rule: Verdict, pooled: dict[str, dict[str, dict[str, Any]]], metric: str,
            higher_is_better: bool) -> dict[str, Any]:
    """Does ``rule.arm`` beat ``rule.beats`` on ``metric``? ``beats``: True / False, or None when it cannot
    be decided (an arm without results; rule ``spread`` with a single seed has no spread to beat).

    ``gain`` is the difference of the means, signed so that positive is better. Rule ``spread``: the
    gain must exceed ``threshold``, the larger of the two sample sds over seeds. Rule ``mean``: it
    must exceed ``margin`` times the other arm's mean (absolute value). Rule ``noninferior``: it must
    exceed minus that (``arm`` is at most ``margin`` of the other's mean worse).
    """
    entry: dict[str, Any] = {"arm": rule.arm, "beats": rule.beats, "metric": metric, "rule": rule.rule,
                             "gain": None, "threshold": None, "result": None}
    a, b = pooled.get(rule.arm, {}).get(metric), pooled.get(rule.beats, {}).get(metric)
    if not a or not b or not a["n"] or not b["n"]:
        return entry
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (a["mean"] - b["mean"])
    if rule.rule == "spread":
        threshold = max(0.0 if math.isnan(a["sd"]) else a["sd"], 0.0 if math.isnan(b["sd"]) else b["sd"])
        result = bool(gain > threshold) if min(a["n"], b["n"]) > 1 else None
    else:
        threshold = rule.margin * abs(b["mean"]) * (-1.0 if rule.rule == "noninferior" else 1.0)
        result = bool(gain > threshold)
    entry.update(gain=gain, threshold=threshold, result=result, paired=paired(a, b, higher_is_better))
    return entry
