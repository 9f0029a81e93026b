"""``holons predict MODEL IMAGES_OR_MANIFEST --out DIR``: apply a fine-tuned radiograph model.

Every image goes through the model's recorded preprocessing. A classifier writes
``predictions.csv``: ``path``, one ``prob_<class>`` column per class (multi-label: per finding) and
``predicted`` (multi-label: the findings at or above 0.5, joined by ``;``). A segmenter writes, per
image, its masks in the SOURCE image's geometry (same height x width as the file):
``masks/<name>/<structure>.png`` (0 / 255) and ``masks/<name>.nii.gz`` (uint8, axes x, y, structure in
the model's order, so that ``get_fdata()[..., k].T`` is the ``H x W`` mask), listed in ``masks.csv``.
Unreadable files are reported (one line each) and skipped; ``skipped.csv`` lists them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from holons.data.formats import detect_format
from holons.data.image import describe_error
from holons.data.preprocess import Geometry
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.inputs import READ_ERRORS
from holons.finetune.model_folder import CONFIG_FILE, RadiographModel, load_model
from holons.runs import progress_enabled, resolve_device

__all__ = ["PredictResult", "list_images", "predict"]

PREDICTIONS_FILE = "predictions.csv"
MASKS_FILE = "masks.csv"
SKIPPED_FILE = "skipped.csv"


@dataclass
class PredictResult:
    """Where the predictions went: ``table`` (predictions.csv or masks.csv), how many images were
    predicted, and the skipped files with their reasons."""

    out: Path
    table: Path
    predicted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_images(images: str | Path) -> list[Path]:
    """A folder's image files (recursively, sorted; any format the readers know) or a manifest CSV's
    ``path`` column (relative to the CSV's folder)."""
    images = Path(images)
    if images.is_dir():
        found = sorted(p for p in images.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and detect_format(p) is not None)
        if not found:
            raise HolonsError(f"{images} holds no image files")
        return found
    if images.is_file() and images.suffix.lower() == ".csv":
        table = pd.read_csv(images, dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise HolonsError(f"{images}: a manifest needs a 'path' column")
        if table.empty:
            raise HolonsError(f"{images} lists no images")
        return [p if p.is_absolute() else images.parent / p for p in map(Path, table["path"])]
    if images.is_file():
        return [images]
    raise HolonsError(f"{images} not found (expected a folder of images or a manifest CSV)")


def _names(paths: list[Path]) -> list[str]:
    """A distinct output name per image: its stem, numbered where stems repeat."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.name[:-7] if p.name.lower().endswith(".nii.gz") else p.stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


def _write_masks(out: Path, name: str, masks: np.ndarray, structures: list[str]) -> dict[str, str]:
    """``masks`` (``K x H x W`` bool, source geometry) as PNGs and one NIfTI; the relative paths."""
    import nibabel as nib
    from PIL import Image

    folder = out / "masks" / name
    folder.mkdir(parents=True, exist_ok=True)
    row = {}
    for k, s in enumerate(structures):
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(folder / f"{s}.png")
        row[s] = str((folder / f"{s}.png").relative_to(out))
    volume = np.ascontiguousarray(masks.transpose(2, 1, 0).astype(np.uint8))  # x, y, structure
    nifti = out / "masks" / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(nifti))
    row["nifti"] = str(nifti.relative_to(out))
    return row


def _class_columns(model: RadiographModel) -> list[str]:
    if model.meta.get("single_label", True) and len(model.labels) == 1:
        return [f"prob_{c}" for c in model.class_names[0]]
    if all(c == ["absent", "present"] for c in model.class_names):
        return [f"prob_{t}" for t in model.labels]
    pairs = zip(model.labels, model.class_names, strict=True)
    return [f"prob_{t}_{c}" for t, classes in pairs for c in classes]


def _classify_rows(model: RadiographModel, outputs: list[np.ndarray]) -> list[list]:
    """Per image: the probability columns and the predicted label(s)."""
    binary = not (len(model.labels) == 1 and model.meta.get("single_label", True)) and all(
        c == ["absent", "present"] for c in model.class_names)
    rows = []
    for i in range(len(outputs[0])):
        if binary:
            probs = [float(o[i, 1]) for o in outputs]
            predicted = ";".join(t for t, p in zip(model.labels, probs, strict=True) if p >= 0.5)
        else:
            probs = [float(v) for o in outputs for v in o[i]]
            predicted = ";".join(classes[int(o[i].argmax())]
                                 for o, classes in zip(outputs, model.class_names, strict=True))
        rows.append([*probs, predicted])
    return rows


def predict(model: str | Path | RadiographModel, images: str | Path, *, out: str | Path, batch_size: int = 8,
            device: str | None = "auto", threshold: float | None = None, progress: bool | None = None,
            report: Callable[[str], None] | None = print) -> PredictResult:
    """Apply the model folder ``model`` to a folder of images or a manifest CSV; write into ``out`` (module
    docstring). ``threshold``: mask probability (default: the one the segmenter was trained with)."""
    import torch

    from holons.finetune.classifier import class_probabilities
    from holons.finetune.segmenter import predict_probabilities

    if not isinstance(model, RadiographModel) and _is_localizer(model):
        return _predict_localizer(model, images, out=out, batch_size=batch_size, device=device,
                                  progress=progress, report=report)
    dev = resolve_device(device)
    model = model if isinstance(model, RadiographModel) else load_model(model, dev)
    model.module.to(dev)
    paths = list_images(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _names(paths)
    prep = model.preprocessing
    if threshold is None:
        threshold = float(model.meta["head"].get("threshold", 0.5))
    skipped: list[tuple[str, str]] = []
    rows: list[list] = []
    show = progress_enabled(progress)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not show)
    for start in range(0, len(paths), batch_size):
        chunk = range(start, min(start + batch_size, len(paths)))
        canvases, geometries, kept = [], [], []
        for i in chunk:
            try:
                canvas, geometry = prep.read(paths[i])
            except READ_ERRORS as e:
                reason = describe_error(e)
                skipped.append((str(paths[i]), reason))
                if report is not None:
                    (tqdm.write if show else report)(f"skipped {paths[i]}: {reason}")
                continue
            canvases.append(canvas)
            geometries.append(geometry)
            kept.append(i)
        bar.update(len(chunk))
        if not kept:
            continue
        x = model.inputs(np.stack(canvases))
        with torch.no_grad():
            if model.task == "classify":
                outputs = class_probabilities(model.module, x, batch_size=batch_size, device=dev)
                predicted = _classify_rows(model, outputs)
                rows += [[str(paths[i]), *r] for i, r in zip(kept, predicted, strict=True)]
            else:
                probs = predict_probabilities(model.module, x, batch_size=batch_size, device=dev)
                rows += [_segment_row(out, paths[i], names[i], p, g, model.labels, threshold)
                         for i, p, g in zip(kept, probs, geometries, strict=True)]
    bar.close()
    if model.task == "classify":
        columns = ["path", *_class_columns(model), "predicted"]
        table = out / PREDICTIONS_FILE
    else:
        columns = ["path", "height", "width", "nifti", *model.labels]
        table = out / MASKS_FILE
    pd.DataFrame(rows, columns=columns).to_csv(table, index=False)
    if skipped:
        with atomic_write(out / SKIPPED_FILE, "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)
    return PredictResult(out=out, table=table, predicted=len(rows), skipped=skipped)


def _is_localizer(folder: str | Path) -> bool:
    config = Path(folder) / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("task") == "localize"


def _predict_localizer(folder: str | Path, images: str | Path, *, out: str | Path, batch_size: int,
                       device: str | None, progress: bool | None,
                       report: Callable[[str], None] | None) -> PredictResult:
    """A weakly supervised localizer (``holons finetune localize``): ``boxes.csv`` and one map PNG per
    image in the source geometry (``holons.finetune.localize.predict``); unreadable files skipped."""
    from holons.finetune.localize.predict import predict_maps, write_predictions

    skipped: list[tuple[str, str]] = []
    prediction = predict_maps(folder, list_images(images), batch_size=batch_size, device=device or "auto",
                              progress=progress_enabled(progress), skipped=skipped)
    if report is not None:
        for path, reason in skipped:
            report(f"skipped {path}: {reason}")
    table = write_predictions(prediction, out)
    return PredictResult(out=Path(out), table=table, predicted=len(prediction.names), skipped=skipped)


def _segment_row(out: Path, path: Path, name: str, probabilities: np.ndarray, geometry: Geometry,
                 structures: list[str], threshold: float) -> list:
    masks = geometry.map_to_source(probabilities) > threshold
    files = _write_masks(out, name, masks, structures)
    return [str(path), geometry.orig_h, geometry.orig_w, files["nifti"], *(files[s] for s in structures)]
