"""Benchmark of ``holons index``: header-only throughput against a full decode, and memory against file count.

1. Throughput: generated radiograph-sized DICOM files (uncompressed, RLE Lossless, JPEG 2000 Lossless) are
   indexed (headers only, in one process, manifest written) and, separately, read with a full
   ``pydicom.dcmread`` plus ``pixel_array``; the ratio of files/s is printed per transfer syntax and for the
   mixed set (target >= 10x). ``--cold`` also measures with the files evicted from the page cache before
   each pass (``posix_fadvise``), as on an archive much larger than memory.
2. Memory: peak RSS of indexing N, N/2 and N/4 tiny generated files, each in a fresh process, for the
   indexing process and for its largest worker. Flat means the growth does not scale with the file count.

    python benchmarks/bench_index.py                  # about a minute
    python benchmarks/bench_index.py --n 100000       # the full memory check (100,000 files)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

SYNTAXES = {"native": ExplicitVRLittleEndian, "rle": RLELossless, "j2k": JPEG2000Lossless}
_ID_PLACEHOLDER = b"BENCH-PATIENT-000000"  # even length, patched per file (same length keeps the file valid)
_SECRET = b"benchmark-site-secret"


def make_template(size: int, syntax: str) -> bytes:
    """One CR file of ``size`` x ``size`` 12-bit pixels (smooth anatomy-like pattern plus noise) as bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("template", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = _ID_PLACEHOLDER.decode()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[:size, :size] / size
    smooth = 1500 + 1000 * np.sin(6 * xx) * np.cos(4 * yy)
    noise = np.random.default_rng(0).normal(0, 30, (size, size))
    ds.PixelData = np.clip(smooth + noise, 0, 4095).astype(np.uint16).tobytes()
    if syntax != "native":
        ds.compress(SYNTAXES[syntax])
    path = Path(tempfile.mkstemp(suffix=".dcm")[1])
    try:
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()
    finally:
        path.unlink()


def write_copies(template: bytes, folder: Path, n: int, per_folder: int = 1000) -> list[Path]:
    """``n`` copies of ``template`` with distinct patient ids, ``per_folder`` files per sub-folder."""
    start = template.index(_ID_PLACEHOLDER)
    width = len(_ID_PLACEHOLDER)
    paths = []
    for i in range(n):
        sub = folder / f"d{i // per_folder:04d}"
        if i % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pid = f"P{i:0{width - 1}d}".encode()
        path = sub / f"f{i:06d}.dcm"
        path.write_bytes(template[:start] + pid + template[start + width:])
        paths.append(path)
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (no root needed; pages must be clean, hence the fsync)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_full_decode(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is what is timed
    return time.perf_counter() - start


def time_index(folder: Path, manifest: Path, workers: int) -> float:
    from holons.data.index import index_archive

    start = time.perf_counter()
    summary = index_archive(folder, manifest, secret=_SECRET, modalities=None, workers=workers,
                            progress=False)
    elapsed = time.perf_counter() - start
    assert summary["n_new"] == summary["n_files"] and summary["by_status"].get("ok") == summary["n_files"]
    manifest.unlink()
    return elapsed


def throughput(tmp: Path, args: argparse.Namespace) -> list[dict]:
    warm_up = tmp / "warm-up"
    write_copies(make_template(16, "native"), warm_up, 4)
    time_index(warm_up, tmp / "warm-up.parquet", workers=1)  # lazy imports are not part of the timing
    rows = []
    passes = ["warm", "cold"] if args.cold else ["warm"]
    for syntax in args.syntaxes:
        template = make_template(args.size, syntax)
        folder = tmp / "throughput" / syntax
        paths = write_copies(template, folder, args.files)
        for mode in passes:
            if mode == "cold":
                evict(paths)
            t_index = time_index(folder, tmp / f"m-{syntax}-{mode}.parquet", workers=1)
            if mode == "cold":
                evict(paths)
            t_parallel = time_index(folder, tmp / f"p-{syntax}-{mode}.parquet", workers=args.workers)
            if mode == "cold":
                evict(paths)
            else:
                for path in paths:  # the index touched headers only: warm the pixels too
                    path.read_bytes()
            t_full = time_full_decode(paths)
            n = len(paths)
            rows.append({"syntax": syntax, "cache": mode, "files": n, "mb_per_file": len(template) / 1e6,
                         "index_files_s": n / t_index, "index_parallel_files_s": n / t_parallel,
                         "full_files_s": n / t_full, "ratio": t_full / t_index,
                         "t_index": t_index, "t_full": t_full})
    for mode in passes:
        same = [r for r in rows if r["cache"] == mode]
        n = sum(r["files"] for r in same)
        t_index, t_full = sum(r["t_index"] for r in same), sum(r["t_full"] for r in same)
        rows.append({"syntax": "mixed", "cache": mode, "files": n, "mb_per_file": float("nan"),
                     "index_files_s": n / t_index, "index_parallel_files_s": float("nan"),
                     "full_files_s": n / t_full, "ratio": t_full / t_index,
                     "t_index": t_index, "t_full": t_full})
    return rows


_MEMORY_PROBE = """
import json, resource, sys, time
from holons.data.index import index_archive

def status_kb(key):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None

try:  # reset the peak (VmHWM) so that the import-time peak does not hide the indexing peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
s = index_archive(sys.argv[1], sys.argv[2], secret=b"bench", modalities=None, workers=int(sys.argv[3]),
                  progress=False)
seconds = time.perf_counter() - start
peak = status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"files": s["n_files"], "seconds": seconds, "base_kb": base, "peak_kb": peak,
                  "worker_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def memory(tmp: Path, args: argparse.Namespace) -> list[dict]:
    template = make_template(8, "native")
    full = tmp / "memory" / f"n{args.n}"
    paths = write_copies(template, full, args.n)
    rows = []
    for n in sorted({max(1, args.n // 4), max(1, args.n // 2), args.n}):
        root = full if n == args.n else tmp / "memory" / f"n{n}"
        if root != full:
            for path in paths[:n]:
                target = root / path.relative_to(full)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
        manifest = tmp / f"memory-{n}.parquet"
        command = [sys.executable, "-c", _MEMORY_PROBE, str(root), str(manifest), str(args.workers)]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(manifest_mb=manifest.stat().st_size / 1e6,
                      growth_mb=(result["peak_kb"] - result["base_kb"]) / 1024,
                      worker_peak_mb=result["worker_peak_kb"] / 1024,
                      files_s=result["files"] / result["seconds"])
        rows.append(result)
    return rows


def print_tables(results: dict) -> None:
    print(f"\n# holons index benchmark, {results['date']}, {results['machine']}")
    print("\n## Throughput: header-only index (1 process) vs full dcmread + pixel_array (target >= 10x)")
    print(f"{'syntax':<8} {'cache':<5} {'files':>6} {'MB/file':>8} {'index f/s':>10} "
          f"{'index f/s (' + str(results['workers']) + 'w)':>16} {'full f/s':>9} {'ratio':>8}")
    for r in results["throughput"]:
        print(f"{r['syntax']:<8} {r['cache']:<5} {r['files']:>6} {r['mb_per_file']:>8.2f} "
              f"{r['index_files_s']:>10.0f} {r['index_parallel_files_s']:>16.0f} {r['full_files_s']:>9.1f} "
              f"{r['ratio']:>7.1f}x")
    print("\n## Peak memory of indexing tiny files (fresh process each; RSS growth over the imports)")
    print(f"{'files':>8} {'files/s':>8} {'growth MB':>10} {'worker peak MB':>15} {'manifest MB':>12}")
    for r in results["memory"]:
        print(f"{r['files']:>8} {r['files_s']:>8.0f} {r['growth_mb']:>10.1f} {r['worker_peak_mb']:>15.1f} "
              f"{r['manifest_mb']:>12.2f}")
    mem = results["memory"]
    if len(mem) > 1:
        extra_files = max(mem[-1]["files"] - mem[0]["files"], 1)
        slope = (mem[-1]["growth_mb"] - mem[0]["growth_mb"]) * 1024 * 1024 / extra_files
        print(f"growth per extra file: {slope:.0f} bytes "
              f"({mem[0]['files']} -> {mem[-1]['files']} files)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200,
                        help="files per transfer syntax for throughput (enough to amortise start-up)")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels for throughput")
    parser.add_argument("--syntaxes", nargs="+", choices=sorted(SYNTAXES), default=["native", "rle", "j2k"])
    parser.add_argument("--cold", action="store_true", help="also measure with files out of the page cache")
    parser.add_argument("--n", type=int, default=5000, help="largest file count of the memory check")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4), help="index workers")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for generated files (default: system)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "workers": args.workers, "throughput": [], "memory": [],
    }
    with tempfile.TemporaryDirectory(prefix="holons-bench-index-", dir=args.tmp) as tmp:
        if not args.skip_throughput:
            results["throughput"] = throughput(Path(tmp), args)
        if not args.skip_memory:
            results["memory"] = memory(Path(tmp), args)
    print_tables(results)
    return results


if __name__ == "__main__":
    main()
