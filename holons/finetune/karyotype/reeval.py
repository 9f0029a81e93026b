"""Evaluate a trained karyotype run again on its recorded test split, without retraining.

Every requested head, with and without test-time mirror averaging (``train.test_time_hflip``) and,
with ``vflip``, also with mirror and upside-down averaging (``train.test_time_vflip``). The metrics
are those of the run's own test evaluation (``evaluate.evaluate_split``, the same flip seed), so
the plain row reproduces the run's numbers. Writes ``RUN/reeval/<head>_<plain|hflip|hvflip>/``
(predictions, confusion matrix) and ``RUN/reeval/results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.karyotype.evaluate import evaluate_split
from holons.finetune.karyotype.model_folder import load_model, run_datasets
from holons.runs import resolve_device

REEVAL_KEYS = ("type_accuracy", "polarity_accuracy", "macro_f1", "case_accuracy_none", "case_accuracy_greedy",
               "case_accuracy_optimal", "cases_fully_correct_optimal")
"""The metrics of each row, after ``head``, ``test_time_hflip`` and ``test_time_vflip``."""
HEADS = ("g", "l", "fusion", "mean")


def model_heads(meta: dict, heads: list[str] | None) -> list[str]:
    """The requested heads (default: the model's output head), checked against the model."""
    available = list(HEADS) if meta["config"]["model"]["variant"] != "g_only" else ["g"]
    for head in heads or [meta["head"]]:
        if head not in available:
            raise HolonsError(f"head {head!r} is not in this model; choose from {available}")
    return list(heads or [meta["head"]])


def reevaluate(run: str | Path, data: str | Path, heads: list[str] | None = None, *, vflip: bool = False,
               device: str = "auto") -> list[dict[str, Any]]:
    """One row per (head, test-time averaging: none / mirror / with ``vflip`` mirror + upside down) on
    the test rows of ``run`` (its ``split.csv``, looked up in the manifest ``data``)."""
    run = Path(run)
    dev = resolve_device(device)
    model, meta = load_model(run, dev)
    test = run_datasets(run, data, meta, names=("test",))["test"]
    cfg = meta["config"]
    rows = []
    for head in model_heads(meta, heads):
        for hflip, vf in [(False, False), (True, False)] + ([(True, True)] if vflip else []):
            name = f"{head}_{'hvflip' if vf else 'hflip' if hflip else 'plain'}"
            s = evaluate_split(model, test, head, dev, run / "reeval" / name, dispatch=cfg["dispatch"],
                               seed=cfg["data"]["split_seed"], batch_size=cfg["train"]["eval_batch_size"],
                               hflip=hflip, vflip=vf)
            rows.append({"head": head, "test_time_hflip": hflip, "test_time_vflip": vf,
                         **{k: s[k] for k in REEVAL_KEYS}})
    with atomic_write(run / "reeval" / "results.json", "w") as f:
        json.dump({"run": str(run), "test_chromosomes": len(test), "rows": rows}, f, indent=2)
    return rows
