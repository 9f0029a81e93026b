"""The study's record: ``<name>.json`` (claim, command, commit, seeds, values, mean, sd, hardware, date) and a
Markdown table to paste into docs/results.md; ``results/*.json`` in the repository hold copies of these."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from datetime import datetime
from typing import Any

from holons.study.spec import REPO, StudySpec

__all__ = ["commit", "hardware", "now", "markdown"]


def commit() -> str | None:
    """The git commit of the holons code that runs the study (``+dirty`` with uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    """Processor, core count, torch version and the GPUs torch sees (no host name)."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "system": platform.system(), "python": platform.python_version(), "torch": torch.__version__,
            "gpus": gpus}


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}"


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats or not stats["n"]:
        return "–"
    sd = stats.get("sd")
    return _num(stats["mean"]) + ("" if sd is None or math.isnan(sd) else f" ± {_num(sd)}")


_WORDS = {True: "**yes**", False: "no", None: "undecided"}


def _hardware_words(hw: dict[str, Any]) -> str:
    gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
    return f"{hw.get('processor')}, {hw.get('cpus')} cores, {gpus}, torch {hw.get('torch')}"


def markdown(record: dict[str, Any], spec: StudySpec) -> str:
    """The study as Markdown: what, how to rerun it, one row per arm (mean ± sd over seeds), verdicts."""
    primary = spec.metrics[spec.primary]
    names = [spec.primary, *[m for m in spec.metrics if m != spec.primary]]
    arrow = {"max": "↑", "min": "↓"}
    lines = [f"## {spec.name}" + (f": {spec.claim}" if spec.claim else ""), ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Primary metric: **{spec.primary}** ({'higher' if primary.higher_is_better else 'lower'} is "
              f"better). Seeds {', '.join(map(str, record['seeds']))}; mean ± sample sd over seeds. "
              f"Commit `{record.get('commit')}`, {record.get('date')}, "
              f"{_hardware_words(record['hardware'])}.",
              "", "```bash", record.get("command") or "", "```", "",
              "| arm | " + " | ".join(f"{n} {arrow[spec.metrics[n].goal]}" for n in names) + " | seeds |",
              "|---" * (len(names) + 2) + "|"]
    for arm in spec.arms:
        stats = record["arms"].get(arm)
        if stats is None:
            lines.append(f"| {arm} | " + " | ".join("–" for _ in names) + " | 0 |")
            continue
        n = stats[spec.primary]["n"]
        lines.append(f"| {arm} | " + " | ".join(_cell(stats.get(m)) for m in names) + f" | {n} |")
    if record["verdicts"]:
        lines += ["", f"Verdicts on {spec.primary}:"]
        for v in record["verdicts"]:
            how = {"spread": "gain over the larger seed sd", "mean": "gain over the margin",
                   "noninferior": "no loss beyond the margin"}[v["rule"]]
            relation = "no worse than" if v["rule"] == "noninferior" else "beats"
            text = f"- {v['arm']} {relation} {v['beats']}: {_WORDS[v['result']]}"
            if v["gain"] is not None:
                text += f" (gain {v['gain']:+.4g}, threshold {v['threshold']:.4g}: {how}"
                p = v.get("paired")
                if p and p["n"] > 1:
                    text += (f"; paired gain {_num(p['mean'])} ± {_num(p['sd'])}, "
                             f"better in {p['wins']} of {p['n']}")
                text += ")"
            lines.append(text)
    bad = {k: j for k, j in record["jobs"].items() if j["status"] != "done"}
    if bad:
        words = [f"{k} {j['status']}" + (f" ({j['error']})" if j.get("error") else "")
                 for k, j in bad.items()]
        lines += ["", "Jobs not finished: " + "; ".join(words)]
    return "\n".join(lines) + "\n"
