"""Synthetic PA chest radiograph phantoms with exact ground truth, written in the layout of JSRT/SCR.

The phantoms are described by ``chest_params``, drawn and outlined by ``chest_anatomy`` and
rendered by ``chest_render``; this module writes data sets of them.

Output layout of ``generate_radiographs(out, ...)``::

    out/images/<id>.png                      8-bit PNG (when "png" in formats)
    out/dicom/<train|val|test>/<id>.dcm      12-bit CR/DX DICOM, by split (when "dicom" in formats)
    out/masks/<structure>/<id>.png           255 inside
    out/landmarks/<RL|LL|H|RCLA|LCLA>/<id>.npy   (N, 2) float64 (x, y) pixel coordinates
    out/landmarks_long.csv                   image,structure,point_index,x,y
    out/image_table.csv                      one row per image: ids, split, findings, paths

The DICOMs stand in for a hospital archive, and they are sorted by split so that pretraining can
index ``dicom/train`` alone: the val / test images, on which correspondence and few-shot
segmentation are evaluated, then never reach a pretraining cache.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from holons.data.splits import index_split
from holons.data.synthetic.chest_anatomy import sample_patient, vary_acquisition
from holons.data.synthetic.chest_params import LANDMARK_KEYS, STRUCTURES, PhantomParams, SynthError
from holons.data.synthetic.chest_render import pixel_spacing_mm, render_phantom
from holons.data.workers import usable_cpus
from holons.files import atomic_write

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
TABLE_COLUMNS = (
    "id", "patient_id", "split", "acquisition", "sex", "modality", "photometric", "size",
    "pixel_spacing_mm", "ctr", "cardiomegaly", "nodule", "nodule_x", "nodule_y", "nodule_size",
    "nodule_size_mm", "nodule_side", "effusion", "effusion_side", "rotation_deg", "inspiration",
    "image_path", "dicom_path",
)


@dataclass(frozen=True)
class _Job:
    out: str
    seed: int
    index: int
    patient: int
    acquisition: int
    image_id: str
    patient_id: str
    split: str
    size: int
    findings_rate: float
    formats: tuple[str, ...]


def dicom_relpath(image_id: str, split: str) -> str:
    """Where an image's DICOM lives, relative to the phantom folder: ``dicom/<split>/<id>.dcm``."""
    return f"dicom/{split}/{image_id}.dcm"


def _patient_params(seed: int, patient: int, findings_rate: float) -> PhantomParams:
    return sample_patient(np.random.default_rng([seed, patient, 0]), findings_rate=findings_rate)


def _make_image(job: _Job) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Render and write one image with its masks and landmarks; return its table row and landmarks."""
    from holons.data.synthetic.dicom_writer import radiograph_dicom_bytes

    out = Path(job.out)
    patient = _patient_params(job.seed, job.patient, job.findings_rate)
    rng = np.random.default_rng([job.seed, job.patient, job.acquisition + 1])
    params = vary_acquisition(rng, patient)
    if job.acquisition == 0:
        params = replace(params, inspiration=1.0)
    phantom = render_phantom(rng, job.size, params)
    modality = ("CR", "DX")[(job.index + job.seed) % 2]
    photometric = "MONOCHROME1" if (job.index + job.seed) % 3 == 0 else "MONOCHROME2"
    spacing = pixel_spacing_mm(params, job.size)

    for s in STRUCTURES:
        _write_png(out / "masks" / s / f"{job.image_id}.png", phantom.masks[s].astype(np.uint8) * 255)
        buf = io.BytesIO()
        np.save(buf, phantom.landmarks[s])
        _write_file(out / "landmarks" / LANDMARK_KEYS[s] / f"{job.image_id}.npy", buf.getvalue())
    image_path = dicom_path = ""
    if "png" in job.formats:
        image_path = f"images/{job.image_id}.png"
        _write_png(out / image_path, np.round(phantom.image * 255).astype(np.uint8))
    if "dicom" in job.formats:
        dicom_path = dicom_relpath(job.image_id, job.split)
        data = radiograph_dicom_bytes(
            phantom.image, patient_id=job.patient_id, sex=patient.sex,
            modality=modality, photometric=photometric, pixel_spacing_mm=spacing,
            uid_entropy=("holons-phantom", str(job.seed), job.patient_id, str(job.acquisition)),
            acquisition=job.acquisition, rng=rng,
        )
        _write_file(out / dicom_path, data)
    row = {
        "id": job.image_id, "patient_id": job.patient_id, "split": job.split, "acquisition": job.acquisition,
        "sex": patient.sex, "modality": modality if dicom_path else "",
        "photometric": photometric if dicom_path else "",
        "size": job.size, "pixel_spacing_mm": round(spacing, 6), **phantom.findings,
        "rotation_deg": round(params.rotation_deg, 3), "inspiration": round(params.inspiration, 4),
        "image_path": image_path, "dicom_path": dicom_path,
    }
    return row, phantom.landmarks


def _write_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    _write_file(path, buf.getvalue())


def _write_file(path: Path, data: bytes) -> None:
    """Write through a temporary sibling and rename, so no half-written file ever has the final name.

    Unlike ``atomic_write`` this skips fsync: a dozen small files per image would spend most of
    the run in fsync, and an interrupted set is recognisable anyway because ``image_table.csv``
    (fsynced) is written last.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_radiographs(
    out: str | os.PathLike,
    *,
    n: int,
    seed: int = 0,
    size: int = 256,
    images_per_patient: int = 3,
    findings_rate: float = 0.3,
    formats: tuple[str, ...] | list[str] = ("dicom", "png"),
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``n`` phantom radiographs with masks, landmarks and an image table; return the table path.

    Images come in groups of ``images_per_patient`` acquisitions of one synthetic patient, and
    the train/val/test split is by patient. The same ``seed`` gives identical files (DICOM: the
    same pixels and UIDs) whatever ``workers`` is. ``formats`` picks "png" and/or "dicom" images
    (DICOMs go to ``dicom/<split>/``, so ``holons index out/dicom/train`` gives a pretraining
    archive without the evaluation images); masks and landmarks are always written;
    ``image_table.csv`` is written last, so a set without it is incomplete. A folder holding an
    earlier phantom set is updated in place (files the new set does not own are removed); folders
    holding anything else are refused.
    """
    formats = tuple(formats)
    _check_args(n, size, images_per_patient, findings_rate, formats)
    out = Path(out)
    old_ids = _previous_ids(out)
    n_patients = math.ceil(n / images_per_patient)
    splits = index_split(  # by patient; each split non-empty from 3 patients on
        n_patients, test_fraction=SPLIT_FRACTIONS["test"], val_fraction=SPLIT_FRACTIONS["val"], seed=seed
    ).tolist()
    jobs = []
    for i in range(n):
        patient, acq = divmod(i, images_per_patient)
        patient_id = f"PHANTOM-{patient:04d}"
        jobs.append(_Job(str(out.absolute()), seed, i, patient, acq, f"phantom_{patient:04d}_{acq:02d}",
                         patient_id, splits[patient], size, findings_rate, formats))
    if workers is None:
        workers = 1 if n < 24 else min(8, usable_cpus())
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    (out / "image_table.csv").unlink(missing_ok=True)  # no table until the new set is complete
    bar = tqdm(total=n, desc="phantoms", unit="img", disable=not progress)
    results: list[tuple[dict, dict] | None] = [None] * n
    if workers > 1 and n > 1:
        context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
        pool = cf.ProcessPoolExecutor(max_workers=min(workers, n), mp_context=context)
        try:
            futures = {pool.submit(_make_image, job): job.index for job in jobs}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for job in jobs:
            results[job.index] = _make_image(job)
            bar.update()
    bar.close()

    new_dicoms = {str(row["dicom_path"]) for row, _ in results if row["dicom_path"]}
    _remove_stale(out, old_ids, {job.image_id for job in jobs}, new_dicoms, formats)
    _write_landmarks_csv(out / "landmarks_long.csv", [(r[0]["id"], r[1]) for r in results])
    table = out / "image_table.csv"
    with atomic_write(table, "w") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row, _ in results:
            writer.writerow({k: _fmt(row[k]) for k in TABLE_COLUMNS})
    return table


def _check_args(n: int, size: int, images_per_patient: int, findings_rate: float, formats: tuple) -> None:
    if n < 1:
        raise SynthError(f"--n must be at least 1, got {n}")
    if not 32 <= size <= 4096:
        raise SynthError(f"--size must be between 32 and 4096 pixels, got {size}")
    if images_per_patient < 1:
        raise SynthError(f"images_per_patient must be at least 1, got {images_per_patient}")
    if not 0.0 <= findings_rate <= 1.0:
        raise SynthError(f"findings_rate must be within [0, 1], got {findings_rate}")
    unknown = set(formats) - {"png", "dicom"}
    if unknown or not formats:
        raise SynthError(f"formats must be a non-empty subset of ('png', 'dicom'), got {formats}")


_LAYOUT = {"images", "dicom", "masks", "landmarks", "landmarks_long.csv", "image_table.csv"}


def _previous_ids(out: Path) -> set[str]:
    """Image ids of an earlier (possibly interrupted) phantom set in ``out``.

    A folder holding anything but the phantom layout is refused, so nothing of the user's is
    overwritten or deleted.
    """
    if out.exists() and not out.is_dir():
        raise SynthError(f"output path exists and is not a folder: {out}")
    if not out.exists():
        return set()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _LAYOUT)
    if foreign:
        raise SynthError(f"refusing to write phantoms into a non-empty folder with other files "
                         f"({', '.join(foreign[:3])}): {out}")
    ids = set()
    for sub in ("images", "masks/*", "landmarks/*"):
        for folder in out.glob(sub):
            if folder.is_dir():
                ids.update(p.stem for p in folder.iterdir() if p.suffix in (".png", ".npy"))
    ids.update(p.stem for p in _previous_dicoms(out))
    return ids


def _previous_dicoms(out: Path) -> list[Path]:
    """DICOMs of an earlier set: ``dicom/<split>/*.dcm``, and ``dicom/*.dcm`` of the older flat layout."""
    return [p for pattern in ("dicom/*.dcm", *(f"dicom/{s}/*.dcm" for s in SPLIT_FRACTIONS))
            for p in out.glob(pattern) if p.is_file()]


def _remove_stale(out: Path, old_ids: set[str], new_ids: set[str], new_dicoms: set[str],
                  formats: tuple[str, ...]) -> None:
    """Delete the files of an earlier set that the new set does not own (other ids, dropped formats).

    A DICOM is stale unless it sits at a path of ``new_dicoms``: an image whose patient moved to
    another split leaves no copy in its old split's folder for ``holons index`` to find.
    """
    for path in _previous_dicoms(out):
        if path.relative_to(out).as_posix() not in new_dicoms:
            path.unlink(missing_ok=True)
    for split in SPLIT_FRACTIONS:
        folder = out / "dicom" / split
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for image_id in old_ids:
        gone = image_id not in new_ids
        paths = []
        if gone or "png" not in formats:
            paths.append(out / "images" / f"{image_id}.png")
        if gone:
            paths += [out / "masks" / s / f"{image_id}.png" for s in STRUCTURES]
            paths += [out / "landmarks" / LANDMARK_KEYS[s] / f"{image_id}.npy" for s in STRUCTURES]
        for path in paths:
            path.unlink(missing_ok=True)


def _write_landmarks_csv(path: Path, items: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    with atomic_write(path, "w") as f:
        f.write("image,structure,point_index,x,y\n")
        for image_id, landmarks in items:
            for s in STRUCTURES:
                key = LANDMARK_KEYS[s]
                for k, (x, y) in enumerate(landmarks[s]):
                    f.write(f"{image_id},{key},{k},{x:.4f},{y:.4f}\n")


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}".rstrip("0").rstrip(".")
    return value
