"""Archive index: rows and statuses, filters, walking rules, incremental / resumable runs, privacy, CLI."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import holons.data.index as index_mod
import holons.data.index_readers as readers_mod
from holons.cli import main
from holons.data.formats import (
    DICOM_EMPTY_REASON,
    DICOM_HEADER_TRUNCATED_REASON,
    NOT_DICOM_REASON,
    PIXEL_DATA_TRUNCATED_REASON,
)
from holons.data.image import UnreadableImage
from holons.data.index import format_summary, index_archive
from holons.data.manifest import MANIFEST_COLUMNS, read_manifest
from holons.data.privacy import SECRET_ENV, load_site_secret, pseudonymize
from holons.data.readers import read_image
from holons.errors import HolonsError

SECRET = b"test-site-secret"
# Recognisable identifiers: none of them may appear in any output.
PHI = {
    "name": "Zyxwvut^Quokka",
    "patient_id": "PIDQ-778899-XYZ",
    "birth": "19450317",
    "accession": "ACCQ55443322",
    "study_uid": "1.2.826.0.1.3680043.8.498.7777123456789",
    "series_uid": "1.2.826.0.1.3680043.8.498.7777987654321",
}
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"


def write_dicom(path: Path, *, modality: str = "CR", rows: int = 16, cols: int = 12, body_part: str = "CHEST",
                pixels: bool = True, patient_id: str = PHI["patient_id"], study_uid: str = PHI["study_uid"],
                series_uid: str = PHI["series_uid"], sop_class: str = CR_STORAGE, seed: int = 0) -> Path:
    """A small valid DICOM file with identifying tags that the index must never reveal."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PHI["name"]
    ds.PatientID = patient_id
    ds.PatientBirthDate = PHI["birth"]
    ds.AccessionNumber = PHI["accession"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    if pixels:
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (rows, cols), np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, size: tuple[int, int] = (20, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(path)
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small mixed archive: ok radiographs, filtered and non-image objects, junk and a broken file."""
    root = tmp_path / "archive"
    write_dicom(root / "p1" / "cr.dcm")
    write_dicom(root / "p1" / "dx_noext", modality="DX", rows=40, cols=30, body_part="HAND")
    write_dicom(root / "p2" / "ct.dcm", modality="CT")
    write_dicom(root / "p2" / "sr.dcm", modality="SR", pixels=False, sop_class=SR_STORAGE)
    write_dicom(root / "p2" / "nopix.dcm", pixels=False)
    broken = write_dicom(root / "p3" / "broken.dcm")
    broken.write_bytes(broken.read_bytes()[:-100])  # pixel data cut short
    write_png(root / "png" / "chest.png")
    (root / "notes.txt").write_text("not an image")
    return root


def run(archive: Path, out: Path, **kw) -> dict:
    kw.setdefault("secret", SECRET)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return index_archive(archive, out, **kw)


def by_path(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in read_manifest(out).to_dict("records")}


def test_rows_columns_and_statuses(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    summary = run(archive, out)
    df = read_manifest(out)
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert df.attrs["archive_root"] == str(archive.resolve())
    rows = by_path(out)
    assert set(rows) == {"p1/cr.dcm", "p1/dx_noext", "p2/ct.dcm", "p2/sr.dcm", "p2/nopix.dcm",
                         "p3/broken.dcm", "png/chest.png", "notes.txt"}
    cr = rows["p1/cr.dcm"]
    assert (cr["status"], cr["reason"], cr["format"], cr["modality"]) == ("ok", "", "dicom", "CR")
    assert (cr["rows"], cr["cols"], cr["bits_stored"], cr["photometric"]) == (16, 12, 12, "MONOCHROME1")
    assert (cr["body_part"], cr["view_position"]) == ("CHEST", "PA")
    assert cr["transfer_syntax"] == ExplicitVRLittleEndian
    assert cr["size"] == (archive / "p1/cr.dcm").stat().st_size
    assert cr["mtime"] == (archive / "p1/cr.dcm").stat().st_mtime_ns
    assert rows["p1/dx_noext"]["status"] == "ok" and rows["p1/dx_noext"]["rows"] == 40
    assert rows["p2/ct.dcm"]["reason"] == "modality CT not selected"
    assert rows["p2/ct.dcm"]["status"] == "skipped"
    assert rows["p2/sr.dcm"]["status"] == "skipped" and "non-image" in rows["p2/sr.dcm"]["reason"]
    assert rows["p2/nopix.dcm"]["status"] == "skipped" and rows["p2/nopix.dcm"]["reason"] == "no pixel data"
    assert rows["p3/broken.dcm"]["status"] == "error" and "truncated" in rows["p3/broken.dcm"]["reason"]
    png = rows["png/chest.png"]
    assert (png["status"], png["format"], png["rows"], png["cols"], png["modality"], png["patient_id"]) == \
        ("ok", "png", 10, 20, "", "")
    assert rows["notes.txt"]["status"] == "skipped" and rows["notes.txt"]["reason"] == "not an image"
    assert summary["by_status"] == {"ok": 3, "skipped": 4, "error": 1}
    assert summary["n_files"] == 8 and summary["n_new"] == 8 and summary["n_reused"] == 0
    assert summary["by_modality"]["CR"] == 2 and summary["by_reason"]["not an image"] == 1
    text = format_summary(summary)
    assert "ok 3" in text and "modality CT not selected" in text
    assert not (tmp_path / "m.parquet.parts").exists()


def test_filters(archive: Path, tmp_path: Path) -> None:
    rows = by_path(run(archive, tmp_path / "a.parquet", modalities=None)["manifest"])
    assert rows["p2/ct.dcm"]["status"] == "ok"
    assert rows["p2/sr.dcm"]["status"] == "skipped"  # non-image objects stay skipped without a filter
    rows = by_path(run(archive, tmp_path / "b.parquet", body_parts=("chest",))["manifest"])
    assert rows["p1/cr.dcm"]["status"] == "ok"
    assert rows["p1/dx_noext"]["reason"] == "body part HAND not selected"
    assert rows["png/chest.png"]["status"] == "ok"  # tags DICOM lacks elsewhere do not filter other formats
    rows = by_path(run(archive, tmp_path / "c.parquet", min_size=14)["manifest"])
    assert rows["p1/cr.dcm"]["reason"] == "smaller than 14 px"  # 16 x 12
    assert rows["p1/dx_noext"]["status"] == "ok"
    assert rows["png/chest.png"]["status"] == "skipped"  # 20 x 10


def test_hidden_entries_and_symlinks_are_skipped(archive: Path, tmp_path: Path) -> None:
    write_dicom(archive / ".hidden.dcm")
    write_dicom(archive / ".cache" / "inner.dcm")
    outside = write_dicom(tmp_path / "outside" / "x.dcm")
    (archive / "link.dcm").symlink_to(outside)
    (archive / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    out = archive / "m.parquet"  # a manifest inside the archive is not indexed itself
    run(archive, out)
    run(archive, out)
    paths = set(read_manifest(out)["path"])
    assert len(paths) == 8
    assert not any(p.startswith(".") or "/." in p or "link" in p or p.startswith("m.parquet") for p in paths)


def test_incremental_rerun_reads_only_changed_files(archive: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m.parquet"
    run(archive, out)
    first = by_path(out)
    write_dicom(archive / "p1" / "cr.dcm", rows=24, seed=1)  # changed (size differs)
    write_dicom(archive / "p4" / "new.dcm")  # added
    (archive / "notes.txt").unlink()  # deleted
    calls: list[str] = []
    detect = readers_mod.detect_format
    monkeypatch.setattr(readers_mod, "detect_format", lambda p: calls.append(str(p)) or detect(p))
    summary = run(archive, out)
    read = sorted(Path(c).relative_to(archive.resolve()).as_posix() for c in calls)
    assert read == ["p1/cr.dcm", "p3/broken.dcm", "p4/new.dcm"]  # error rows are always retried
    assert (summary["n_new"], summary["n_reused"], summary["n_removed"]) == (3, 5, 1)
    second = by_path(out)
    assert "notes.txt" not in second and "p4/new.dcm" in second
    assert second["p1/cr.dcm"]["rows"] == 24
    assert second["png/chest.png"] == first["png/chest.png"]
    # Changing a filter reclassifies reused rows without reading them again.
    calls.clear()
    summary = run(archive, out, modalities=None)
    assert sorted(Path(c).name for c in calls) == ["broken.dcm"]
    assert by_path(out)["p2/ct.dcm"]["status"] == "ok"
    # A different secret invalidates every pseudonym, so every file is read again.
    calls.clear()
    summary = run(archive, out, secret=b"another-secret")
    assert summary["n_new"] == 8 and "secret" in summary["note"]


def test_resume_after_interruption_and_manifest_stays_valid(archive: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    for i in range(8):
        write_dicom(archive / "more" / f"{i}.dcm", seed=i)
    reference = tmp_path / "ref.parquet"
    run(archive, reference, part_size=3)
    out = tmp_path / "m.parquet"
    write_part = index_mod.write_part
    written = []

    def failing(path, table):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(path)
        write_part(path, table)

    monkeypatch.setattr(index_mod, "write_part", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        run(archive, out, part_size=3)
    assert not out.exists()
    assert len(list((tmp_path / "m.parquet.parts").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(index_mod, "write_part", write_part)
    summary = run(archive, out, part_size=3)
    assert summary["n_resumed"] == 6 and summary["n_new"] == 10
    pd.testing.assert_frame_equal(_sorted(read_manifest(out)), _sorted(read_manifest(reference)))
    assert not (tmp_path / "m.parquet.parts").exists()

    # An interrupted incremental run leaves the previous manifest complete and untouched.
    before = out.read_bytes()
    write_dicom(archive / "more" / "late.dcm")
    written.clear()
    monkeypatch.setattr(index_mod, "write_part", failing)
    with pytest.raises(RuntimeError):
        run(archive, out, part_size=3)
    assert out.read_bytes() == before


def test_final_manifest_write_is_atomic(archive: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m.parquet"
    run(archive, out)
    before = out.read_bytes()
    write_dicom(archive / "late.dcm")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(index_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        run(archive, out)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # Something that is not a manifest is never overwritten.
    junk = tmp_path / "junk.parquet"
    junk.write_text("my thesis")
    with pytest.raises(HolonsError, match="not a readable Parquet manifest"):
        run(archive, junk)
    assert junk.read_text() == "my thesis"


def test_resume_after_sigkill(archive: Path, tmp_path: Path) -> None:
    for i in range(6):
        write_dicom(archive / "more" / f"{i}.dcm", seed=i)
    out = tmp_path / "m.parquet"
    script = textwrap.dedent(f"""
        import os, signal
        import holons.data.index as m
        write, n = m.write_part, [0]
        def write_then_die(path, table):
            if n[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            n[0] += 1
            write(path, table)
        m.write_part = write_then_die
        m.index_archive({str(archive)!r}, {str(out)!r}, secret={SECRET!r}, workers=1, progress=False,
                        part_size=4)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    summary = run(archive, out, part_size=4)
    assert summary["n_resumed"] == 8 and summary["n_files"] == 14
    assert len(read_manifest(out)) == 14


def test_privacy_no_identifiers_anywhere(archive: Path, tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    out = tmp_path / "m.parquet"
    assert main(["index", str(archive), "--out", str(out), "--workers", "2", "--modality"]) == 0
    captured = capfd.readouterr()
    df = read_manifest(out)
    cells = "\n".join(df.astype(str).to_numpy().ravel())
    blob = out.read_bytes()
    for value in PHI.values():
        assert value not in captured.out and value not in captured.err
        assert value not in cells
        assert value.encode() not in blob
    cr = df.set_index("path").loc["p1/cr.dcm"]
    expected = hmac.new(SECRET, PHI["patient_id"].encode(), hashlib.sha256).hexdigest()[:32]
    assert cr["patient_id"] == expected
    assert cr["study_id"] == pseudonymize(PHI["study_uid"], SECRET) != ""
    assert cr["series_id"] not in ("", cr["study_id"])
    readable = (df["format"] == "dicom") & (df["status"] != "error")
    assert (df.loc[readable, "patient_id"] == expected).all()  # same patient, same pseudonym
    assert pseudonymize(PHI["patient_id"], b"other") != expected
    unkeyed = hashlib.sha256(PHI["patient_id"].encode()).hexdigest()[:32]
    assert pseudonymize(PHI["patient_id"], None) == unkeyed
    assert pseudonymize("", SECRET) == ""


def test_site_secret_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(HolonsError, match=SECRET_ENV):
        load_site_secret(None, allow_unkeyed=False)
    assert load_site_secret(None, allow_unkeyed=True) is None
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert load_site_secret(None, allow_unkeyed=False) == b"from-env"
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    assert load_site_secret(f, allow_unkeyed=False) == b"from-file"
    f.write_text("\n")
    with pytest.raises(HolonsError, match="empty"):
        load_site_secret(f, allow_unkeyed=False)
    with pytest.raises(HolonsError, match="cannot read"):
        load_site_secret(tmp_path / "missing", allow_unkeyed=False)


def test_cli_refuses_without_secret_and_runs_unkeyed_when_allowed(archive: Path, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    out = tmp_path / "m.parquet"
    assert main(["index", str(archive), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and SECRET_ENV in err and "--allow-unkeyed-hashes" in err
    assert not out.exists()
    assert main(["index", str(archive), "--out", str(out), "--allow-unkeyed-hashes", "--workers", "1",
                 "--body-part", "CHEST", "--min-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "indexed 8 files" in text and "status:" in text
    rows = by_path(out)
    assert rows["p1/dx_noext"]["reason"] == "body part HAND not selected"
    assert rows["p1/cr.dcm"]["patient_id"] == hashlib.sha256(PHI["patient_id"].encode()).hexdigest()[:32]
    assert main(["index", str(tmp_path / "nowhere"), "--out", str(out), "--allow-unkeyed-hashes"]) == 2


def test_cli_archive_without_a_usable_image_is_an_error(tmp_path: Path, capsys) -> None:
    """No files, or files none of which is an image kept by the filters: one line, exit 2, folder named."""
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--allow-unkeyed-hashes", "--workers", "1"]
    assert main(["index", str(empty), "--out", str(tmp_path / "a.parquet"), *common]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no files found in" in captured.err and str(empty.resolve()) in captured.err
    (empty / "notes.txt").write_text("not an image\n")
    assert main(["index", str(empty), "--out", str(tmp_path / "b.parquet"), *common]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "no usable image in" in err and "1 file, none ok (not an image: 1)" in err
    assert str(tmp_path / "b.parquet") in err and (tmp_path / "b.parquet").is_file()  # reasons kept
    assert "--modality" not in err  # the filter hint only when a filter dropped files


def test_bad_dicom_files_get_one_reason_from_index_and_reader(tmp_path: Path) -> None:
    """A text file named .dcm is not a DICOM file (not "no pixel data"), and a DICOM cut anywhere gets
    the same reason in the manifest as from read_image."""
    root = tmp_path / "bad"
    full = write_dicom(root / "full.dcm").read_bytes()
    (root / "notes.dcm").write_text("this is a text file, not a DICOM file\n")
    (root / "two_bytes.dcm").write_bytes(b"ab")
    name_at = full.index(PHI["name"].encode())
    cuts = {"in_preamble.dcm": 100, "in_file_meta.dcm": 150, "in_header.dcm": name_at + 3,
            "in_pixels.dcm": len(full) - 100}
    for name, n in cuts.items():
        (root / name).write_bytes(full[:n])
    zero = pydicom.dcmread(root / "full.dcm")
    zero.Rows = 0  # the pixel data stays
    zero.save_as(root / "zero_rows.dcm")
    expected = {
        "notes.dcm": ("error", NOT_DICOM_REASON), "two_bytes.dcm": ("error", NOT_DICOM_REASON),
        "in_preamble.dcm": ("error", NOT_DICOM_REASON), "in_file_meta.dcm": ("error", DICOM_EMPTY_REASON),
        "in_header.dcm": ("error", DICOM_HEADER_TRUNCATED_REASON),
        "in_pixels.dcm": ("error", PIXEL_DATA_TRUNCATED_REASON),
        "zero_rows.dcm": ("skipped", "zero-size image (0 x 12)"),
    }
    out = tmp_path / "m.parquet"
    run(root, out, modalities=None)
    rows = by_path(out)
    assert rows["full.dcm"]["status"] == "ok"
    for name, (status, reason) in expected.items():
        assert (rows[name]["status"], rows[name]["reason"]) == (status, reason), name
        with pytest.raises(UnreadableImage) as info:
            read_image(root / name)
        assert info.value.reason == reason, name


def test_second_concurrent_run_is_refused(archive: Path, tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "m.parquet"
    parts = tmp_path / "m.parquet.parts"
    parts.mkdir()
    fd = os.open(parts, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(HolonsError, match="another"):
            run(archive, out)
    finally:
        os.close(fd)


@pytest.mark.skipif(multiprocessing.get_start_method(allow_none=False) != "fork",
                    reason="the crash is injected by patching the parent before forking workers")
def test_a_crashing_reader_costs_one_row_not_the_run(archive: Path, tmp_path: Path, monkeypatch) -> None:
    real = readers_mod.read_header

    def crashing(path, fmt):
        if Path(path).name == "cr.dcm":
            os._exit(1)
        return real(path, fmt)

    monkeypatch.setattr(readers_mod, "read_header", crashing)
    summary = run(archive, tmp_path / "m.parquet", workers=2)
    rows = by_path(tmp_path / "m.parquet")
    assert rows["p1/cr.dcm"]["status"] == "error" and "crashed" in rows["p1/cr.dcm"]["reason"]
    assert rows["p1/dx_noext"]["status"] == "ok" and summary["n_files"] == 8


def test_conformance_archive_every_file_gets_a_row(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "dicom" / "conformance"
    if not root.is_dir():
        pytest.skip("dicom/conformance not present in the shared data")
    out = tmp_path / "m.parquet"
    summary = run(root, out, modalities=None, workers=2)
    df = read_manifest(out)
    rels = (p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    files = {r.as_posix() for r in rels if not any(s.startswith(".") for s in r.parts)}
    assert set(df["path"]) == files and len(df) == len(files) == summary["n_files"]
    assert set(df["status"]) <= {"ok", "skipped", "error"}
    assert (df.loc[df["status"] != "ok", "reason"] != "").all()
    table = pd.read_csv(root / "dicom_index.csv")
    decodable = table[(table["pydicom_decode"] == "ok") & ~table["modality"].fillna("").str.match(r"RT|SEG")]
    merged = decodable.merge(df, left_on="file", right_on="path", suffixes=("_ref", ""))
    assert len(merged) == len(decodable) > 100
    assert (merged["status"] == "ok").all(), merged.loc[merged["status"] != "ok", ["file", "reason"]]
    assert (merged["rows"] == merged["rows_ref"]).all() and (merged["cols"] == merged["cols_ref"]).all()
    dicomdirs = df[df["path"].str.endswith("DICOMDIR")]
    assert len(dicomdirs) > 0 and (dicomdirs["status"] == "skipped").all()


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("path").reset_index(drop=True)


def test_read_manifest_rejects_foreign_parquet(tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(path)
    with pytest.raises(HolonsError, match="not a manifest"):
        read_manifest(path)
    with pytest.raises(HolonsError, match="not found"):
        read_manifest(tmp_path / "missing.parquet")
