"""Predict types and polarity for every chromosome, dispatch per case, write CSV + one JSON per case.

Outputs in ``out``: ``predictions.csv`` (``path, case_id, pred_class_1to24, pred_polarity, p_top,
dispatched_class_1to24``, plus ``p_polarity`` and ``true_class_1to24`` when the manifest has
labels), ``cases/<case>.json`` (counts, sex and its confidence, warnings, what dispatch changed)
``predict_info.json`` (model, data root, preprocessing, unreadable files) and, when the manifest
has labels, ``metrics.json`` + ``confusion.png``: the same metrics, computed by the same code, as
the training run's own test evaluation (polarity here on the images as given). Preprocessing,
head and test-time flips are the ones recorded with the model. Cases are named by their ids only;
nothing else about a patient is written.

When the model folder holds a learned per-cell dispatcher (``holons karyotype fit-dispatch``), the
``learned`` and ``learned_then_optimal`` dispatch methods are available and the metrics also report
them (``*_learned``, ``*_learned_then_optimal``); without one they are refused in one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.karyotype.data import KaryotypeDataset, load_table
from holons.finetune.karyotype.dispatch import ALL_METHODS, LEARNED_METHODS, dispatch_case
from holons.finetune.karyotype.evaluate import label_metrics, write_metrics
from holons.finetune.karyotype.fit_dispatch import NO_DISPATCHER, load_dispatcher, refine
from holons.finetune.karyotype.inference import predict_dataset, predict_with_features
from holons.finetune.karyotype.learned_dispatch import has_cell_dispatcher
from holons.finetune.karyotype.model_folder import load_model, model_folder
from holons.finetune.karyotype.preprocess import Preprocessing
from holons.runs import progress_enabled, resolve_device

PREDICTIONS = "predictions.csv"
INFO = "predict_info.json"
CASES = "cases"


def case_file_name(case_id: str) -> str:
    """A safe file name for a case id (other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(case_id)) + ".json"


def predict_karyotypes(model_dir: str | Path, data: str | Path, out: str | Path, *,
                       dispatch: str = "auto", batch_size: int = 256, device: str = "auto",
                       progress: bool | None = None) -> dict:
    """Run a trained model on a manifest or a folder (one sub-folder per case); see module doc.

    ``dispatch="auto"``: ``learned_then_optimal`` when the model folder holds a learned dispatcher
    (it measured best on pki-3's fixed split, docs/results.md), else ``optimal``.
    """
    learned = has_cell_dispatcher(model_folder(model_dir))
    if dispatch == "auto":
        dispatch = "learned_then_optimal" if learned else "optimal"
    if dispatch not in ALL_METHODS:
        raise HolonsError(f"dispatch must be one of auto, {', '.join(ALL_METHODS)}, got {dispatch!r}")
    if dispatch in LEARNED_METHODS and not learned:
        raise HolonsError(NO_DISPATCHER)
    progress = progress_enabled(progress)
    dev = resolve_device(device)
    model, meta = load_model(model_dir, dev)
    table, skipped_rows = load_table(data, default_polarity=-1)
    if table.empty:
        raise HolonsError(f"{data}: no chromosome images to predict")
    prep = Preprocessing.from_json(meta["preprocessing"])
    ds = KaryotypeDataset(table, preprocessing=prep, size=meta["source_size"], progress=progress)
    if len(ds) == 0:
        first = ds.report.skipped[0]
        raise HolonsError(f"{data}: none of the {len(table)} chromosome images could be read "
                          f"(first: {first[0]}: {first[1]})")
    flips = {"hflip": bool(meta["config"]["train"].get("test_time_hflip", False)),
             "vflip": bool(meta["config"]["train"].get("test_time_vflip", False))}
    t = ds.table
    refined = None
    if learned:  # one pass for the probabilities and the dispatcher's features
        prediction = predict_with_features(model, ds, meta["head"], dev, batch_size, **flips)
        types, pols = prediction.types, prediction.polarity
        refined = refine(load_dispatcher(model_dir, dev), prediction, t["case_id"])
    else:
        types, pols = predict_dataset(model, ds, meta["head"], dev, batch_size, **flips)
    probs = types.numpy().astype(np.float64)
    frame = pd.DataFrame({
        "path": t["path"], "case_id": t["case_id"], "pred_class_1to24": probs.argmax(1) + 1,
        "pred_polarity": pols.numpy().argmax(1), "p_top": probs.max(1).round(5),
        "dispatched_class_1to24": 0, "p_polarity": pols.numpy().max(1).round(5),
    })
    if (t["label"] >= 0).any():
        frame["true_class_1to24"] = t["label"].where(t["label"] >= 0, -1) + 1
    out = Path(out)
    (out / CASES).mkdir(parents=True, exist_ok=True)
    with_warnings = 0
    for case, idx in t.groupby("case_id", sort=True).indices.items():
        result = dispatch_case(probs[idx], dispatch, refined=None if refined is None else refined[idx])
        frame.loc[idx, "dispatched_class_1to24"] = result.labels + 1
        record = {"case_id": str(case), "chromosomes": int(len(idx)), "dispatch": dispatch,
                  **result.to_json()}
        for change in record["changed"]:
            change["path"] = str(t["path"].iloc[idx[change.pop("index")]])
        with_warnings += bool(result.warnings)
        with atomic_write(out / CASES / case_file_name(case), "w") as f:
            json.dump(record, f, indent=2)
    with atomic_write(out / PREDICTIONS, "w") as f:
        frame.to_csv(f, index=False)
    metrics = None
    if len(t) and (t["label"] >= 0).all():
        metrics, per_row = label_metrics(t, probs, pols.numpy(), t["polarity"].to_numpy(), refined=refined)
        metrics = write_metrics({"head": meta["head"], **metrics}, per_row, out, "metrics.json")
    data_path = Path(data).resolve()
    info = {
        "model": str(Path(model_dir).resolve()), "data": str(data_path),
        "data_root": str(data_path if data_path.is_dir() else data_path.parent), "stain": prep.stain,
        "preprocessing": prep.to_json(), "canvas": prep.canvas, "shrunk_to_fit_canvas": ds.report.shrunk,
        "head": meta["head"],
        "dispatch": dispatch, "learned_dispatcher": learned,
        "unreadable": [{"path": p, "reason": r} for p, r in ds.report.skipped], "skipped_rows": skipped_rows,
    }
    with atomic_write(out / INFO, "w") as f:
        json.dump(info, f, indent=2)
    result = {"dispatch": dispatch, "chromosomes": len(frame), "cases": int(t["case_id"].nunique()),
              "skipped": len(ds.report.skipped), "cases_with_warnings": with_warnings}
    if metrics is not None:
        result["metrics"] = {k: v for k, v in metrics.items() if k != "confusion"}
    return result


def read_predictions(folder: str | Path) -> tuple[pd.DataFrame, dict]:
    """``predictions.csv`` and ``predict_info.json`` of a predict folder."""
    folder = Path(folder)
    if not (folder / PREDICTIONS).is_file() or not (folder / INFO).is_file():
        raise HolonsError(f"{folder} has no {PREDICTIONS} / {INFO} (run `holons karyotype predict` first)")
    frame = pd.read_csv(folder / PREDICTIONS, dtype={"case_id": str})
    return frame, json.loads((folder / INFO).read_text())
