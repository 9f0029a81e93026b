"""Chest radiograph phantoms: files and layout, determinism, ground-truth consistency, round trips."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from holons.cli import main
from holons.data.synthetic.chest_params import (
    LANDMARK_COUNTS,
    LANDMARK_KEYS,
    STRUCTURES,
    Nodule,
    PhantomParams,
    SynthError,
)
from holons.data.synthetic.chest_render import render_phantom
from holons.data.synthetic.radiographs import generate_radiographs

SIZE = 128
N = 12


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "image_table.csv", newline="") as f:
        return list(csv.DictReader(f))


def _mask(out: Path, structure: str, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(out / "masks" / structure / f"{image_id}.png")) > 0


def _landmarks(out: Path, structure: str, image_id: str) -> np.ndarray:
    return np.load(out / "landmarks" / LANDMARK_KEYS[structure] / f"{image_id}.npy")


def _border_points(mask: np.ndarray) -> np.ndarray:
    """Midpoints between each inside pixel centre and its outside 4-neighbour: the mask's contour."""
    padded = np.pad(mask, 1)
    y, x = np.nonzero(padded[:, 1:] != padded[:, :-1])
    horizontal = np.stack([x - 0.5, y - 1.0], axis=1)
    y, x = np.nonzero(padded[1:, :] != padded[:-1, :])
    vertical = np.stack([x - 1.0, y - 0.5], axis=1)
    return np.vstack([horizontal, vertical])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_radiographs(out, n=N, seed=3, size=SIZE, findings_rate=0.7, workers=1, progress=False)
    return out


def test_layout_and_image_table(phantoms):
    rows = _table(phantoms)
    assert len(rows) == N
    assert {r["id"] for r in rows} == {p.stem for p in (phantoms / "images").glob("*.png")}
    assert {r["id"] for r in rows} == {p.stem for p in (phantoms / "dicom").rglob("*.dcm")}
    for r in rows:
        assert (phantoms / r["image_path"]).is_file() and (phantoms / r["dicom_path"]).is_file()
        assert r["dicom_path"] == f"dicom/{r['split']}/{r['id']}.dcm"  # DICOMs sorted by split
        for s in STRUCTURES:
            assert _mask(phantoms, s, r["id"]).shape == (SIZE, SIZE)
            points = _landmarks(phantoms, s, r["id"])
            assert points.shape == (LANDMARK_COUNTS[s], 2) and points.dtype == np.float64
    assert [LANDMARK_COUNTS[s] for s in STRUCTURES] == [44, 50, 26, 23, 23]

    # several images per patient, and every patient wholly inside one split
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert len(by_patient) == N // 3
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert {s for splits in by_patient.values() for s in splits} == {"train", "val", "test"}
    assert {r["modality"] for r in rows} == {"CR", "DX"}
    assert {r["photometric"] for r in rows} == {"MONOCHROME1", "MONOCHROME2"}

    # the long landmark table holds exactly the npy points
    with open(phantoms / "landmarks_long.csv", newline="") as f:
        long_rows = list(csv.DictReader(f))
    assert len(long_rows) == N * sum(LANDMARK_COUNTS.values())
    first = rows[0]["id"]
    ll = [(float(r["x"]), float(r["y"])) for r in long_rows if r["image"] == first and r["structure"] == "LL"]
    np.testing.assert_allclose(np.array(ll), _landmarks(phantoms, "left_lung", first), atol=1e-3)


def test_same_seed_same_files_other_seed_differs(phantoms, tmp_path):
    again = tmp_path / "again"
    generate_radiographs(again, n=N, seed=3, size=SIZE, findings_rate=0.7, workers=1, progress=False)
    kinds = {".png", ".npy", ".csv"}
    files = sorted(p.relative_to(phantoms) for p in phantoms.rglob("*") if p.suffix in kinds)
    assert len(files) == N * 11 + 2
    for rel in files:
        assert (phantoms / rel).read_bytes() == (again / rel).read_bytes(), rel
    for dcm in sorted((phantoms / "dicom").rglob("*.dcm")):
        a, b = pydicom.dcmread(dcm), pydicom.dcmread(again / dcm.relative_to(phantoms))
        assert a.PixelData == b.PixelData
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert a[tag].value == b[tag].value

    other = tmp_path / "other"
    generate_radiographs(other, n=3, seed=4, size=SIZE, workers=1, progress=False)
    name = "images/phantom_0000_00.png"
    assert (phantoms / name).read_bytes() != (other / name).read_bytes()


def test_process_pool_gives_the_same_files(phantoms, tmp_path):
    out = tmp_path / "pool"
    generate_radiographs(out, n=4, seed=3, size=SIZE, findings_rate=0.7, workers=2, progress=False)
    for r in _table(out):
        assert (out / r["image_path"]).read_bytes() == (phantoms / r["image_path"]).read_bytes()
        for s in STRUCTURES:
            np.testing.assert_array_equal(_landmarks(out, s, r["id"]), _landmarks(phantoms, s, r["id"]))


def test_masks_disjoint_where_anatomy_is(phantoms):
    for r in _table(phantoms):
        m = {s: _mask(phantoms, s, r["id"]) for s in STRUCTURES}
        assert all(m[s].sum() > 10 for s in STRUCTURES)
        assert not (m["right_lung"] & m["left_lung"]).any()
        assert not (m["right_clavicle"] & m["left_clavicle"]).any()
        lungs = m["right_lung"] | m["left_lung"]
        assert (lungs & m["heart"]).sum() <= 0.02 * m["heart"].sum()


def test_every_landmark_on_its_mask_contour(phantoms):
    worst = 0.0
    for r in _table(phantoms):
        for s in STRUCTURES:
            border = _border_points(_mask(phantoms, s, r["id"]))
            points = _landmarks(phantoms, s, r["id"])
            dist = np.sqrt(((points[:, None, :] - border[None]) ** 2).sum(-1)).min(axis=1)
            worst = max(worst, float(dist.max()))
            assert dist.max() <= 1.0, (r["id"], s, int(dist.argmax()), float(dist.max()))
    assert worst > 0.0


def test_patient_sides_follow_radiographic_convention(phantoms):
    for r in _table(phantoms):
        cx = {s: np.nonzero(_mask(phantoms, s, r["id"]))[1].mean() for s in STRUCTURES}
        assert cx["right_lung"] < SIZE / 2 < cx["left_lung"]
        assert cx["right_clavicle"] < SIZE / 2 < cx["left_clavicle"]
        lung_mid = (cx["right_lung"] + cx["left_lung"]) / 2
        assert cx["heart"] > lung_mid  # the heart bulges to the patient's left = image right
        rl, ll = _landmarks(phantoms, "right_lung", r["id"]), _landmarks(phantoms, "left_lung", r["id"])
        # point 0 is the apex (top), point 21 the costophrenic angle (low and lateral)
        assert rl[0, 1] < rl[10, 1] < rl[21, 1] and rl[21, 0] < rl[0, 0]
        assert ll[0, 1] < ll[10, 1] < ll[21, 1] and ll[21, 0] > ll[0, 0]


def _ctr_from_masks(masks: dict[str, np.ndarray], rotation_deg: float, size: int) -> float:
    """Cardiothoracic ratio measured on the masks after undoing the in-plane rotation."""
    t = math.radians(rotation_deg)

    def xs(mask: np.ndarray) -> np.ndarray:
        y, x = np.nonzero(mask)
        c = (size - 1) / 2
        return math.cos(t) * (x - c) + math.sin(t) * (y - c)

    heart = xs(masks["heart"])
    thorax = xs(masks["left_lung"]).max() - xs(masks["right_lung"]).min()
    return float((heart.max() - heart.min()) / thorax)


def test_cardiomegaly_flag_matches_ctr(phantoms):
    for r in _table(phantoms):
        ctr = float(r["ctr"])
        assert int(r["cardiomegaly"]) == int(ctr > 0.5)
        masks = {s: _mask(phantoms, s, r["id"]) for s in STRUCTURES}
        assert abs(_ctr_from_masks(masks, float(r["rotation_deg"]), SIZE) - ctr) < 0.03
    rng = np.random.default_rng(0)
    for target in (0.42, 0.58):
        ph = render_phantom(rng, 192, replace(PhantomParams(), ctr=target, rotation_deg=4.0))
        assert abs(ph.findings["ctr"] - target) < 0.02
        assert ph.findings["cardiomegaly"] == int(target > 0.5)
        assert abs(_ctr_from_masks(ph.masks, 4.0, 192) - target) < 0.03


def test_findings_are_recorded_and_visible():
    base = replace(PhantomParams(), noise=0.0)
    nodule = Nodule("left", lateral=0.6, height=0.35, diameter_mm=25.0)
    plain = render_phantom(np.random.default_rng(1), 192, base)
    sick = render_phantom(np.random.default_rng(1), 192, replace(base, nodule=nodule, effusion_side="right",
                                                                 effusion_height=0.09))
    f = sick.findings
    assert (f["nodule"], f["nodule_side"], f["effusion"], f["effusion_side"]) == (1, "left", 1, "right")
    x, y = int(round(f["nodule_x"])), int(round(f["nodule_y"]))
    assert sick.masks["left_lung"][y, x]
    assert f["nodule_size_mm"] == 25.0 and f["nodule_size"] == pytest.approx(25.0 * 192 / 358.4)
    assert sick.image[y, x] > plain.image[y, x] + 0.05  # a denser spot where the nodule is
    # the effusion fills the lower lateral recess of the right lung with fluid density
    lung = sick.masks["right_lung"]
    rows = np.nonzero(lung.any(axis=1))[0]
    base_rows = slice(rows[-1] - 8, rows[-1] + 1)
    recess = np.zeros_like(lung)
    recess[base_rows] = lung[base_rows]
    assert sick.image[recess].mean() > plain.image[recess].mean() + 0.05
    assert plain.findings["nodule"] == 0 and math.isnan(plain.findings["nodule_x"])


def test_dicom_headers_are_plausible_and_non_identifying(phantoms):
    studies: dict[str, set[str]] = {}
    for r in _table(phantoms):
        ds = pydicom.dcmread(phantoms / r["dicom_path"])
        assert ds.Modality == r["modality"] and ds.PhotometricInterpretation == r["photometric"]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.PatientID == r["patient_id"] and str(ds.PatientName) == "Phantom^" + r["patient_id"][-4:]
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
        assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
        assert float(ds.PixelSpacing[0]) == pytest.approx(float(r["pixel_spacing_mm"]), rel=1e-4)
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds and "WindowCenter" in ds
        stored = ds.pixel_array
        assert stored.shape == (SIZE, SIZE) and stored.max() <= 4095
        png = np.asarray(Image.open(phantoms / r["image_path"]), dtype=np.float64)
        corr = np.corrcoef(stored.ravel().astype(np.float64), png.ravel())[0, 1]
        # MONOCHROME1 stores inverted values: high stored value = less dense
        assert corr < -0.99 if ds.PhotometricInterpretation == "MONOCHROME1" else corr > 0.99
        studies.setdefault(r["patient_id"], set()).add(ds.StudyInstanceUID)
    assert all(len(uids) == 3 for uids in studies.values())  # one study per acquisition


def test_round_trip_through_read_image(phantoms):
    readers = pytest.importorskip("holons.data.readers")
    for r in _table(phantoms):
        png = readers.read_image(phantoms / r["image_path"])
        dcm = readers.read_image(phantoms / r["dicom_path"])
        assert png.pixels.shape == dcm.pixels.shape == (SIZE, SIZE)
        assert png.pixels.dtype == np.float32 and 0.0 <= png.pixels.min() and png.pixels.max() <= 1.0
        corr = np.corrcoef(png.pixels.ravel(), dcm.pixels.ravel())[0, 1]
        assert corr > 0.98, (r["id"], r["photometric"], corr)
        # bright = dense for both: the heart is brighter than the lungs
        heart = _mask(phantoms, "heart", r["id"])
        lungs = _mask(phantoms, "right_lung", r["id"]) | _mask(phantoms, "left_lung", r["id"])
        assert dcm.pixels[heart].mean() > dcm.pixels[lungs].mean() + 0.1


def test_index_archive_pseudonymises_patients(phantoms, tmp_path):
    from holons.data.index import index_archive
    from holons.data.manifest import read_manifest

    manifest = tmp_path / "manifest.parquet"
    index_archive(phantoms, manifest, secret=b"test", modalities=None, workers=1, progress=False)
    df = read_manifest(manifest)
    dicoms = df[df["path"].str.startswith("dicom/")]
    assert len(dicoms) == N and (dicoms["status"] == "ok").all()
    assert set(dicoms["modality"]) == {"CR", "DX"}
    rows = {r["dicom_path"]: r for r in _table(phantoms)}
    hashed: dict[str, set[str]] = {}
    for path, pid in zip(dicoms["path"], dicoms["patient_id"], strict=True):
        real = rows[path]["patient_id"]
        assert pid and real not in pid and real[-4:] not in pid
        hashed.setdefault(real, set()).add(pid)
    assert all(len(ids) == 1 for ids in hashed.values())  # consistent within a patient
    assert len({next(iter(ids)) for ids in hashed.values()}) == len(hashed)  # distinct across patients
    assert (df[df["path"].str.startswith("images/")]["status"] == "ok").all()


def test_rerun_into_a_phantom_folder_replaces_the_set(tmp_path):
    out = tmp_path / "set"
    generate_radiographs(out, n=4, seed=0, size=64, workers=1, progress=False)
    assert len(list((out / "dicom").rglob("*.dcm"))) == 4
    (out / "image_table.csv").unlink()  # as if the first run had been interrupted
    generate_radiographs(out, n=2, seed=0, size=64, formats=("png",), workers=1, progress=False)
    assert len(_table(out)) == 2
    assert len(list((out / "images").glob("*.png"))) == 2
    assert len(list((out / "masks" / "heart").glob("*.png"))) == 2
    assert len(list((out / "landmarks" / "LL").glob("*.npy"))) == 2
    assert not list((out / "dicom").rglob("*.dcm"))  # no stale DICOM left for `holons index` to find


def test_pretraining_archive_dicom_train_holds_only_train_patients(tmp_path):
    """``dicom/train`` is the archive to pretrain on: exactly the train split; a rerun whose split
    assignment moves patients (other n) and an old flat ``dicom/<id>.dcm`` leave no stale copy behind."""
    out = tmp_path / "set"
    generate_radiographs(out, n=12, seed=0, size=64, formats=("dicom",), workers=1, progress=False)
    before = {r["id"]: r["split"] for r in _table(out)}
    (out / "dicom" / "phantom_0000_00.dcm").write_bytes(b"")  # a file of the older flat layout
    generate_radiographs(out, n=21, seed=0, size=64, formats=("dicom",), workers=1, progress=False)
    rows = _table(out)
    assert any(before.get(r["id"], r["split"]) != r["split"] for r in rows)  # some patients moved split
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    on_disk = {p.relative_to(out).as_posix() for p in (out / "dicom").rglob("*") if p.is_file()}
    assert on_disk == {r["dicom_path"] for r in rows}
    for split in ("train", "val", "test"):
        assert {p.stem for p in (out / "dicom" / split).glob("*.dcm")} == {
            r["id"] for r in rows if r["split"] == split}


def test_bad_arguments_and_foreign_folders_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SynthError, match="non-empty folder"):
        generate_radiographs(foreign, n=1, size=64)
    with pytest.raises(SynthError, match="--n"):
        generate_radiographs(tmp_path / "a", n=0)
    with pytest.raises(SynthError, match="formats"):
        generate_radiographs(tmp_path / "b", n=1, formats=("jpeg",))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_synth_radiographs(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "radiographs", "--out", str(out), "--n", "3", "--seed", "1", "--size", "64"]) == 0
    assert "image table" in capsys.readouterr().out
    assert len(_table(out)) == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    assert main(["synth", "radiographs", "--out", str(foreign), "--n", "1"]) == 2
    assert "non-empty folder" in capsys.readouterr().err
