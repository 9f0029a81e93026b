"""Fit a trained run's learned per-cell dispatcher and compare it with the rule-based dispatch.

:func:`fit_learned_dispatch` (CLI ``holons karyotype fit-dispatch``) loads the run's model, rebuilds
its train / validation / test chromosomes from ``split.csv`` and the manifest with the model's
recorded preprocessing, and runs the one inference path (:func:`~holons.finetune.karyotype.inference.
predict_with_features`: the model's head and test-time flips) for the type log-probabilities and the
pooled features. A :class:`~holons.finetune.karyotype.learned_dispatch.CellDispatcher` is trained on
the training split's cells (the validation split gives its accuracy), saved into the model folder
(``cell_dispatcher.safetensors`` / ``.json``; ``karyotype predict --dispatch learned`` then uses it),
and evaluated on the test split beside the rules. ``eval/learned_dispatch.json`` holds, per method
(``none``, ``greedy``, ``optimal``, ``learned``, ``learned_then_optimal``), the type accuracy, the
mean per-case accuracy and the share of fully correct cases, computed by the same
:func:`~holons.finetune.karyotype.evaluate.label_metrics` as ``predict``'s metrics.

Note that the dispatcher learns from the classifier's outputs on its own training chromosomes,
which are more confident than on unseen cells.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.karyotype.data import KaryotypeDataset
from holons.finetune.karyotype.dispatch import ALL_METHODS
from holons.finetune.karyotype.evaluate import label_metrics
from holons.finetune.karyotype.inference import FeaturePrediction, predict_with_features
from holons.finetune.karyotype.learned_dispatch import (
    CellDispatcher,
    has_cell_dispatcher,
    load_cell_dispatcher,
    refined_probabilities,
    save_cell_dispatcher,
    train_cell_dispatcher,
)
from holons.finetune.karyotype.model import VarifocalNet
from holons.finetune.karyotype.model_folder import load_model, model_folder, run_datasets
from holons.runs import progress_enabled, resolve_device

log = logging.getLogger("holons.karyotype")
REPORT_FILE = "learned_dispatch.json"
NO_DISPATCHER = ("this model has no learned dispatcher; run "
                 "`holons karyotype fit-dispatch --run RUN --data MANIFEST`")


def load_dispatcher(folder: str | Path, device: str | torch.device = "cpu") -> CellDispatcher:
    """The learned dispatcher of a model folder (or run folder); a one-line error when it has none."""
    folder = model_folder(folder)
    if not has_cell_dispatcher(folder):
        raise HolonsError(NO_DISPATCHER)
    return load_cell_dispatcher(folder, device)


def refine(dispatcher: CellDispatcher, prediction: FeaturePrediction, case_ids: Sequence[str]) -> np.ndarray:
    """The dispatcher's refined type probabilities ``(N, 24)`` of ``prediction``'s chromosomes, each
    cell (same case id) seen whole."""
    expected = int(dispatcher.hparams["feature_dim"])
    if prediction.features.shape[1] != expected:
        raise HolonsError(f"the learned dispatcher reads {expected} features, this model gives "
                          f"{prediction.features.shape[1]}; fit it again (`holons karyotype fit-dispatch`)")
    cases = [str(c) for c in case_ids]
    return refined_probabilities(dispatcher, prediction.features, prediction.log_probs, cases)


def method_table(summary: dict) -> dict[str, dict[str, float]]:
    """``label_metrics``' flat keys as ``{method: {type_accuracy, case_accuracy, cases_fully_correct}}``."""
    return {m: {k: summary[f"{k}_{m}"] for k in ("type_accuracy", "case_accuracy", "cases_fully_correct")}
            for m in ALL_METHODS if f"type_accuracy_{m}" in summary}


def fit_on_datasets(model: VarifocalNet, datasets: dict[str, KaryotypeDataset], model_dir: str | Path,
                    eval_dir: str | Path, *, head: str, hflip: bool = False, vflip: bool = False,
                    batch_size: int = 256, steps: int = 600, seed: int = 0,
                    device: str | torch.device = "cpu") -> dict:
    """Train the dispatcher on ``datasets["train"]`` (``"val"`` for its accuracy), save it to
    ``model_dir``, compare on ``datasets["test"]``; writes and returns ``eval_dir/learned_dispatch.json``."""
    t0 = time.perf_counter()
    device = torch.device(device)
    preds = {name: predict_with_features(model, ds, head, device, batch_size, hflip=hflip, vflip=vflip)
             for name, ds in datasets.items() if len(ds)}
    if "train" not in preds:
        raise HolonsError("no training chromosomes to fit the learned dispatcher on")

    def inputs(name: str) -> tuple:
        ds, p = datasets[name], preds[name]
        return p.features, p.log_probs, ds.labels.numpy(), [str(c) for c in ds.table["case_id"]]

    val = inputs("val") if "val" in preds else None
    dispatcher = train_cell_dispatcher(*inputs("train"), val=val, steps=steps, seed=seed, device=device)
    save_cell_dispatcher(dispatcher, model_dir)
    report = {
        "head": head, "steps": steps, "seed": seed, "feature_dim": int(preds["train"].features.shape[1]),
        "cells": {name: int(ds.table["case_id"].nunique()) for name, ds in datasets.items()},
        "chromosomes": {name: len(ds) for name, ds in datasets.items()},
        "val_accuracy": dispatcher.val_accuracy,
        "val_accuracy_none": float((preds["val"].types.argmax(1).numpy() == val[2]).mean())
        if val is not None else None,
        "methods": {},
    }
    if "test" in preds:
        test, p = datasets["test"], preds["test"]
        refined = refine(dispatcher, p, test.table["case_id"])
        summary, _ = label_metrics(test.table, p.types.numpy().astype(np.float64), p.polarity.numpy(),
                                   refined=refined)
        report.update({"test_chromosomes": summary["test_chromosomes"], "test_cases": summary["test_cases"],
                       "methods": method_table(summary)})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(eval_dir / REPORT_FILE, "w") as f:
        json.dump(report, f, indent=2)
    log.info("learned dispatch: %s", json.dumps(report["methods"]))
    return report


def fit_learned_dispatch(run_dir: str | Path, manifest: str | Path, *, steps: int = 600, seed: int = 0,
                         device: str = "cpu", progress: bool | None = None) -> dict:
    """Fit the learned dispatcher of the run in ``run_dir`` on ``manifest`` (the run's own; see the
    module doc) and return the comparison written to ``run_dir/eval/learned_dispatch.json``."""
    if steps < 1:
        raise HolonsError(f"steps must be >= 1, got {steps}")
    progress = progress_enabled(progress)
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    model, meta = load_model(run_dir, dev)
    datasets = run_datasets(run_dir, manifest, meta, progress=progress)
    train_cfg = meta["config"]["train"]
    report = fit_on_datasets(model, datasets, model_folder(run_dir), run_dir / "eval", head=meta["head"],
                             hflip=bool(train_cfg.get("test_time_hflip", False)),
                             vflip=bool(train_cfg.get("test_time_vflip", False)),
                             batch_size=int(train_cfg.get("eval_batch_size", 256)), steps=steps, seed=seed,
                             device=dev)
    return report


def format_report(report: dict) -> str:
    """The comparison as a small plain-text table."""
    val = report.get("val_accuracy")
    lines = [f"learned dispatch: {report.get('test_chromosomes', 0)} test chromosomes in "
             f"{report.get('test_cases', 0)} cases; dispatcher validation accuracy "
             f"{'n/a' if val is None else f'{val:.4f}'}",
             f"{'method':<22}{'type acc':>10}{'case acc':>10}{'fully correct':>15}"]
    for method, m in report["methods"].items():
        lines.append(f"{method:<22}{m['type_accuracy']:>10.4f}{m['case_accuracy']:>10.4f}"
                     f"{m['cases_fully_correct']:>15.3f}")
    return "\n".join(lines)
