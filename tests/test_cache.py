"""Decode-once cache, its Dataset and patient-level splits, on small generated archives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from holons.cli import main
from holons.data import cache as cache_module
from holons.data.cache import CacheError, build_cache, format_cache_summary
from holons.data.dataset import CachedImageDataset
from holons.data.preprocess import Geometry
from holons.data.splits import patient_keys, patient_splits

SIZE = 32


def _write_dicom(path: Path, pixels: np.ndarray, patient: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.BodyPartExamined = "DX", patient, "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_manifest(manifest: Path, root: Path, rows: list[dict]) -> None:
    columns = ["path", "size", "mtime", "format", "modality", "body_part", "view_position", "rows", "cols",
               "photometric", "bits_stored", "transfer_syntax", "patient_id", "study_id", "series_id",
               "status", "reason"]
    df = pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], columns=columns)
    for c in ("size", "mtime", "rows", "cols", "bits_stored"):
        df[c] = pd.to_numeric(df[c].replace("", 0)).astype("int64")
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"holons.archive_root": os.fsencode(root.resolve())})
    pq.write_table(table, manifest)


def _row(root: Path, rel: str, fmt: str, patient: str | None = None, status: str = "ok") -> dict:
    st = (root / rel).stat()
    return {"path": rel, "size": st.st_size, "mtime": st.st_mtime_ns, "format": fmt, "status": status,
            "reason": "" if status == "ok" else "filtered", "patient_id": patient or ""}


@pytest.fixture()
def archive(tmp_path: Path) -> dict:
    """Six DICOMs of three patients, a wide and a tall PNG, a corrupt DICOM, a non-ok row."""
    root = tmp_path / "archive"
    (root / "dicom").mkdir(parents=True)
    (root / "png").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        rel = f"dicom/img{i}.dcm"
        _write_dicom(root / rel, rng.integers(0, 4096, (40, 40)), patient=f"P{i % 3}")
        rows.append(_row(root, rel, "dicom", patient=f"hash{i % 3}"))
    Image.fromarray(np.full((32, 64), 200, np.uint8)).save(root / "png/wide.png")
    Image.fromarray(np.full((64, 32), 100, np.uint8)).save(root / "png/tall.png")
    rows += [_row(root, "png/wide.png", "png"), _row(root, "png/tall.png", "png")]
    _write_dicom(root / "dicom/broken.dcm", rng.integers(0, 4096, (40, 40)), patient="P9")
    whole = (root / "dicom/broken.dcm").read_bytes()
    (root / "dicom/broken.dcm").write_bytes(whole[: len(whole) - 1600])  # pixel data cut short
    rows.append(_row(root, "dicom/broken.dcm", "dicom", patient="hash9"))
    rows.append(_row(root, "dicom/img0.dcm", "dicom", status="skipped") | {"path": "dicom/not_ok.dcm"})
    manifest = tmp_path / "manifest.parquet"
    _write_manifest(manifest, root, rows)
    return {"root": root, "manifest": manifest, "rows": rows, "tmp": tmp_path}


def _index(cache: Path) -> pd.DataFrame:
    return pd.read_parquet(cache / "index.parquet")


def test_build_layout_shapes_and_counts(archive):
    out = archive["tmp"] / "cache"
    summary = build_cache(archive["manifest"], out, size=SIZE, shard_size=3, workers=1, progress=False)
    assert (summary["cached"], summary["skipped"], summary["manifest_not_ok"]) == (8, 1, 1)
    assert summary["shards"] == 3 and summary["decoded_now"] == 8
    index = _index(out)
    assert sorted(index["path"]) == sorted(r["path"] for r in archive["rows"][:8])
    total = 0
    for shard, rows in index.groupby("shard"):
        array = np.load(out / "shards" / f"shard-{shard:05d}.npy", mmap_mode="r")
        assert array.dtype == np.uint8 and array.shape[1:] == (SIZE, SIZE)
        assert sorted(rows["position"]) == list(range(array.shape[0]))
        total += array.shape[0]
    assert total == 8
    config = json.loads((out / "cache.json").read_text())
    assert (config["size"], config["dtype"], config["cached"], config["complete"]) == (SIZE, "uint8", 8, True)
    assert "8 images" in format_cache_summary(summary)
    assert not list((out / "shards").glob(".*.tmp"))

    out16 = archive["tmp"] / "cache16"
    build_cache(archive["manifest"], out16, size=SIZE, dtype="uint16", workers=1, progress=False)
    ds16, ds8 = CachedImageDataset(out16), CachedImageDataset(out)
    assert ds16.raw(0).dtype == np.uint16 and ds16.raw(0).max() > 255
    stored = CachedImageDataset(out16, as_stored=True)[0]
    assert stored.dtype == torch.uint16 and stored.shape == (1, SIZE, SIZE)
    np.testing.assert_array_equal(stored[0].numpy(), ds16.raw(0))
    torch.testing.assert_close(stored.float() / 65535, ds16[0])
    by_path = {p: i for i, p in enumerate(ds8.table["path"])}
    for i, path in enumerate(ds16.table["path"]):
        assert torch.allclose(ds16[i], ds8[by_path[path]], atol=1 / 255)


def test_aspect_kept_and_padding(archive):
    out = archive["tmp"] / "cache"
    build_cache(archive["manifest"], out, size=SIZE, workers=1, progress=False)
    ds = CachedImageDataset(out, return_meta=True)
    rows = ds.table.set_index("path")
    wide = rows.loc["png/wide.png"]
    assert (wide.content_h, wide.content_w, wide.pad_top, wide.pad_left) == (16, 32, 8, 0)
    assert (wide.orig_h, wide.orig_w) == (32, 64) and wide.scale_x == pytest.approx(0.5)
    image = ds[ds.table.index[ds.table["path"] == "png/wide.png"][0]]["image"]
    assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    content = image[0, 8:24]
    assert float(content.min()) > 0.7 and float(image[0, :8].max()) == 0 and float(image[0, 24:].max()) == 0
    assert float((image[0] > 0).float().mean()) == pytest.approx(0.5)
    tall = rows.loc["png/tall.png"]
    assert (tall.content_h, tall.content_w, tall.pad_top, tall.pad_left) == (32, 16, 0, 8)
    corners = Geometry.from_row(tall).to_source(np.array([[8.0, 0.0], [24.0, 32.0]]))
    np.testing.assert_allclose(corners, [[0, 0], [32, 64]])
    square = rows.loc["dicom/img0.dcm"]
    assert (square.content_h, square.pad_top, square.pad_left) == (SIZE, 0, 0)


def test_unreadable_file_is_skipped_with_reason(archive):
    out = archive["tmp"] / "cache"
    summary = build_cache(archive["manifest"], out, size=SIZE, workers=1, progress=False)
    skipped = pd.read_parquet(out / "skipped.parquet")
    assert list(skipped["path"]) == ["dicom/broken.dcm"]
    assert skipped["reason"].iloc[0].strip()
    assert sum(summary["skipped_by_reason"].values()) == 1
    assert not {"dicom/broken.dcm", "dicom/not_ok.dcm"} & set(_index(out)["path"])
    again = build_cache(archive["manifest"], out, size=SIZE, workers=1, progress=False)
    assert again["decoded_now"] == 0 and again["skipped_now"] == 0 and again["skipped"] == 1


def test_resume_after_growth_kill_and_change(archive, monkeypatch):
    tmp, root, rows = archive["tmp"], archive["root"], archive["rows"]
    reference = tmp / "reference"
    build_cache(archive["manifest"], reference, size=SIZE, workers=1, progress=False)
    ref = CachedImageDataset(reference)
    ref_images = {p: ref.raw(i) for i, p in enumerate(ref.table["path"])}

    subset = tmp / "subset.parquet"
    _write_manifest(subset, root, rows[:3])
    out = tmp / "cache"
    assert build_cache(subset, out, size=SIZE, shard_size=2, workers=1, progress=False)["cached"] == 3

    real_write, calls = cache_module._write_shard, []

    def dying_write(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build_cache(archive["manifest"], out, size=SIZE, shard_size=2, workers=1, progress=False)
    monkeypatch.setattr(cache_module, "_write_shard", real_write)
    assert len(_index(out)) == 3  # the index still describes the last finished run

    summary = build_cache(archive["manifest"], out, size=SIZE, shard_size=2, workers=1, progress=False)
    assert summary["reused"] == 3 + 4 and summary["decoded_now"] == 1  # 2 shards finished before the kill
    ds = CachedImageDataset(out)
    assert ds.table["path"].is_unique and set(ds.table["path"]) == set(ref_images)
    for i, path in enumerate(ds.table["path"]):
        np.testing.assert_array_equal(ds.raw(i), ref_images[path])

    changed = rows[0]["path"]
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "png" / "new.png")
    os.utime(root / changed, ns=(1_000_000_000, 1_000_000_000))
    grown = [_row(root, changed, "dicom", patient="hash0"), *rows[1:], _row(root, "png/new.png", "png")]
    _write_manifest(archive["manifest"], root, grown)
    summary = build_cache(archive["manifest"], out, size=SIZE, shard_size=2, workers=1, progress=False)
    assert summary["decoded_now"] == 2 and summary["cached"] == 9 and summary["dead_slots"] == 1
    assert _index(out)["path"].is_unique


def test_refuses_other_settings_and_foreign_folder(archive):
    out = archive["tmp"] / "cache"
    build_cache(archive["manifest"], out, size=SIZE, workers=1, progress=False)
    with pytest.raises(CacheError, match="size"):
        build_cache(archive["manifest"], out, size=SIZE * 2, workers=1, progress=False)
    foreign = archive["tmp"] / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a holons cache"):
        build_cache(archive["manifest"], foreign, size=SIZE, workers=1, progress=False)
    with pytest.raises(CacheError, match="manifest not found"):
        build_cache(archive["tmp"] / "missing.parquet", out, size=SIZE, workers=1, progress=False)


def test_parallel_build_matches_serial(archive):
    serial, parallel = archive["tmp"] / "serial", archive["tmp"] / "parallel"
    build_cache(archive["manifest"], serial, size=SIZE, workers=1, progress=False)
    summary = build_cache(archive["manifest"], parallel, size=SIZE, shard_size=4, workers=2, progress=False)
    assert (summary["cached"], summary["skipped"]) == (8, 1)
    a, b = CachedImageDataset(serial), CachedImageDataset(parallel)
    b_rows = {p: i for i, p in enumerate(b.table["path"])}
    for i, path in enumerate(a.table["path"]):
        np.testing.assert_array_equal(a.raw(i), b.raw(b_rows[path]))


def test_dataloader_workers_and_distributed_subsets(archive):
    out = archive["tmp"] / "cache"
    build_cache(archive["manifest"], out, size=SIZE, shard_size=3, workers=1, progress=False)
    ds = CachedImageDataset(out, return_meta=True)
    direct = torch.stack([ds[i]["image"] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), direct, rtol=0, atol=0)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(ds)))
    assert sum(len(b["patient_id"]) for b in batches) == len(ds)

    world = 4  # 8 images: divisible, so DistributedSampler adds no padding
    seen = [list(DistributedSampler(ds, num_replicas=world, rank=r, seed=1)) for r in range(world)]
    flat = [i for part in seen for i in part]
    assert sorted(flat) == list(range(len(ds)))
    parts = [list(ds.shard_for_rank(r, 3).indices) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(ds)))
    assert all(set(parts[a]).isdisjoint(parts[b]) for a in range(3) for b in range(a + 1, 3))


def test_patient_level_splits(archive):
    out = archive["tmp"] / "cache"
    build_cache(archive["manifest"], out, size=SIZE, workers=1, progress=False,
                split_fractions=(0.5, 0.25, 0.25))
    index = _index(out)
    with_id = index.dropna(subset=["patient_id"])
    assert len(with_id) == 6 and with_id.groupby("patient_id")["split"].nunique().max() == 1
    parts = [CachedImageDataset(out, split=s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(index)
    assert CachedImageDataset(out, split="test", fractions=(0, 0, 1)).table.shape[0] == len(index)
    with pytest.raises(CacheError):
        CachedImageDataset(out, split="holdout")

    ids = [f"patient{i % 400}" for i in range(2000)]
    labels = patient_splits(ids, seed=3)
    frame = pd.DataFrame({"pid": ids, "split": labels})
    assert frame.groupby("pid")["split"].nunique().max() == 1
    share = frame.drop_duplicates("pid")["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.8, abs=0.06) and share["test"] == pytest.approx(0.1, abs=0.05)
    np.testing.assert_array_equal(labels, patient_splits(ids, seed=3))
    assert not np.array_equal(labels, patient_splits(ids, seed=4))
    grown = patient_splits(ids + [f"new{i}" for i in range(50)], seed=3)[: len(ids)]
    np.testing.assert_array_equal(grown, labels)  # adding patients never moves existing ones
    assert patient_keys(["a", None, ""], ["x", "y", "z"]) == ["patient:a", "path:y", "path:z"]
    with pytest.raises(ValueError):
        patient_splits(ids, fractions=(0.5, 0.5, 0.5))


def test_cache_refuses_empty_input(archive, capsys):
    """A folder instead of a manifest, a manifest without an ok row, or ok rows none of which decodes:
    one line naming the folder / manifest, exit 2, and no cache is left to look finished."""
    tmp, root = archive["tmp"], archive["root"]
    out = tmp / "cache"
    args = ["--out", str(out), "--size", str(SIZE), "--workers", "1"]
    assert main(["cache", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "expected a manifest file (from `holons index`), got a folder" in err and str(root) in err

    empty = tmp / "empty.parquet"
    _write_manifest(empty, root, [])
    assert main(["cache", str(empty), *args]) == 2
    err = capsys.readouterr().err
    assert f"no usable image in {empty}" in err and "lists no files" in err
    not_ok = tmp / "not_ok.parquet"
    _write_manifest(not_ok, root, [r for r in archive["rows"] if r["status"] != "ok"])
    assert main(["cache", str(not_ok), *args]) == 2
    err = capsys.readouterr().err
    assert f"no usable image in {not_ok}" in err and "none of its 1 rows is ok (filtered: 1)" in err
    assert not out.exists()  # refused before any work

    broken = tmp / "broken.parquet"
    _write_manifest(broken, root, [r for r in archive["rows"] if r["path"] == "dicom/broken.dcm"])
    assert main(["cache", str(broken), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"no usable image in {broken}: none of its 1 ok rows could be decoded" in err
    assert str(out / "skipped.parquet") in err and len(pd.read_parquet(out / "skipped.parquet")) == 1
    assert not (out / "index.parquet").exists()
    assert not json.loads((out / "cache.json").read_text())["complete"]


def test_one_patient_manifest_never_leaves_train_empty(archive, capsys):
    """Patients are placed by a hash of their id: with one patient the train split can come out empty.
    That is an error pointing to --split-fractions 1 0 0, whose rerun reuses the decoded image."""
    tmp, root = archive["tmp"], archive["root"]
    pid = next(f"hash{i}" for i in range(100) if patient_splits([f"patient:hash{i}"])[0] != "train")
    row = next(r for r in archive["rows"] if r["path"] == "dicom/img1.dcm") | {"patient_id": pid}
    one = tmp / "one.parquet"
    _write_manifest(one, root, [row])
    out = tmp / "cache"
    args = ["cache", str(one), "--out", str(out), "--size", str(SIZE), "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"the train split of {one} is empty" in err and "--split-fractions 1 0 0" in err
    assert not (out / "index.parquet").exists()
    assert main([*args, "--split-fractions", "1", "0", "0"]) == 0
    assert "0 decoded now, 1 reused" in capsys.readouterr().out
    ds = CachedImageDataset(out, split="train")
    assert len(ds) == 1
    # a patient that lands in train needs nothing
    pid = next(f"hash{i}" for i in range(100) if patient_splits([f"patient:hash{i}"])[0] == "train")
    _write_manifest(one, root, [row | {"patient_id": pid}])
    summary = build_cache(one, tmp / "cache2", size=SIZE, workers=1, progress=False)
    assert summary["splits"] == {"train": 1, "val": 0, "test": 0}


def test_cli_index_then_cache(archive, capsys, monkeypatch):
    monkeypatch.setenv("HOLONS_SITE_SECRET", "test-secret")
    manifest, out = archive["tmp"] / "indexed.parquet", archive["tmp"] / "cache"
    assert main(["index", str(archive["root"]), "--out", str(manifest), "--workers", "1"]) == 0
    args = ["cache", str(manifest), "--out", str(out), "--size", str(SIZE), "--workers", "1",
            "--split-fractions", "0", "0", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "8 images" in printed and "splits" in printed
    ds = CachedImageDataset(out)
    assert len(ds) == 8 and set(ds.table["split"]) == {"test"}
    ids = set(ds.table["patient_id"].dropna())
    assert len(ids) == 3 and not ids & {"P0", "P1", "P2"}  # keyed hashes, never the raw ids
    assert main([*args[:5], "16"]) == 2
    assert "size" in capsys.readouterr().err
