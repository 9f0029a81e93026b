"""Benchmark: images/s into DataLoader batches from the decode-once cache vs decoding every time.

Builds ``--n`` synthetic 12-bit DICOM radiographs (``--side`` pixels square; a share of 8-bit
PNGs with ``--png-fraction``) in a temporary folder, indexes and caches them, then times full
shuffled passes of the same DataLoader (batch 64) over datasets that all yield ``1 x S x S``
float tensors in [0, 1], once per ``--loader-workers`` setting:

- ``cache``: ``CachedImageDataset`` over the shards;
- ``source``: ``read_image`` + the cache's own resize-and-pad, from the files, on every access;
- ``monai``: MONAI ``LoadImage`` + intensity scaling + resize (longest side) + pad, same files;
- ``cache_stored`` (extra): the cache delivering its stored uint8, converted on the device.

The source files were just written, so they sit in the page cache: the comparison is against
decoding at its best, not against a cold disk. With DataLoader workers, moving float32 batches
between processes caps every method (about 3,000 images/s at 256 x 256 on a busy 2-core VM);
``cache_stored`` moves a quarter of the bytes. Each process uses ``--torch-threads`` threads
(DataLoader workers use 1 anyway). Run::

    .venv/bin/python benchmarks/bench_cache.py            # about a minute on 2 CPU cores
    .venv/bin/python benchmarks/bench_cache.py --n 1000 --side 2048 --loader-workers 0 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from holons.data.cache import build_cache
from holons.data.dataset import CachedImageDataset
from holons.data.index import index_archive
from holons.data.manifest import read_manifest
from holons.data.preprocess import Preprocessing
from holons.data.readers import read_image


# --------------------------------------------------------------------------- synthetic archive
def _phantom(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth 12-bit chest-like image: bright body ellipse, darker lungs, noise."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.48) ** 2 < 1
    lungs = sum(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1 for cx in (0.33, 0.67))
    image = 300 + 2500 * body - 1500 * (lungs > 0) + 200 * np.sin(20 * yy + rng.uniform(0, 6))
    return np.clip(image + rng.normal(0, 60, image.shape), 0, 4095).astype(np.uint16)


def _write_dicom(path: Path, pixels: np.ndarray, patient: str) -> None:
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.BodyPartExamined, ds.ViewPosition = "DX", patient, "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1800, 3200
    ds.PixelSpacing = [0.35, 0.35]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_archive(root: Path, n: int, side: int = 512, png_fraction: float = 0.0, seed: int = 0) -> None:
    """``n`` phantom radiographs under ``root``: DICOMs (3 images per patient) and some PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    n_png = int(round(n * png_fraction))
    for i in range(n):
        sub = root / f"patient{i // 3:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = _phantom(rng, side)
        if i < n_png:
            Image.fromarray((pixels >> 4).astype(np.uint8)).save(sub / f"image{i:05d}.png")
        else:
            _write_dicom(sub / f"image{i:05d}.dcm", pixels, patient=f"BENCH{i // 3:05d}")


# --------------------------------------------------------------------------- datasets to compare
class SourceDecodeDataset(Dataset):
    """Decodes from the source file on every access: ``read_image`` + the cache's resize and pad."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        canvas, _ = Preprocessing(size=self.size).apply(read_image(self.paths[index]).pixels)
        return torch.from_numpy(canvas).unsqueeze(0)


class MonaiLoadDataset(Dataset):
    """MONAI's usual pipeline on the same files: LoadImage, scale to [0, 1], resize longest side, pad."""

    def __init__(self, paths: list[str], size: int):
        from monai.transforms import Compose, EnsureType, LoadImage, Resize, ScaleIntensity, SpatialPad

        self.paths = paths
        self.transform = Compose([
            LoadImage(image_only=True, ensure_channel_first=True),
            ScaleIntensity(),
            Resize(spatial_size=size, size_mode="longest", mode="bilinear", anti_aliasing=True),
            SpatialPad(spatial_size=(size, size)),
            EnsureType(data_type="tensor", track_meta=False),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.paths[index]).float()


# --------------------------------------------------------------------------- timing
def images_per_second(dataset: Dataset, batch_size: int, workers: int, min_seconds: float) -> dict[str, Any]:
    """Steady-state throughput of shuffled full passes (workers started and warmed before timing)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for i, _ in enumerate(loader):  # start the workers, import their modules, touch the files
        if i >= 1:
            break
    images, passes, start = 0, 0, time.perf_counter()
    while True:
        for batch in loader:
            if batch.dtype != torch.float32:
                batch = batch.float().div_(255)  # what the trainer does on its device
            images += batch.shape[0]
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    del loader
    return {"images_per_s": images / elapsed, "seconds": elapsed, "passes": passes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of source images")
    parser.add_argument("--side", type=int, default=512, help="side of the source images")
    parser.add_argument("--size", type=int, default=256, help="cached image side")
    parser.add_argument("--png-fraction", type=float, default=0.0, help="share of sources written as PNG")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to time (each for every method)")
    parser.add_argument("--cache-workers", type=int, default=None, help="processes building the cache")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timing per method, at least one pass")
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="holons-bench-cache-") as tmp:
        work = args.workdir or Path(tmp)
        archive, manifest, cache = work / "archive", work / "manifest.parquet", work / "cache"
        t0 = time.perf_counter()
        make_archive(archive, args.n, side=args.side, png_fraction=args.png_fraction)
        t_generate = time.perf_counter() - t0
        index_archive(archive, manifest, secret=b"bench", workers=args.cache_workers, progress=False)
        rows = read_manifest(manifest)
        paths = [os.fspath(archive / p) for p in rows.loc[rows["status"] == "ok", "path"]]
        t0 = time.perf_counter()
        summary = build_cache(manifest, cache, size=args.size, workers=args.cache_workers, progress=False)
        t_build = time.perf_counter() - t0

        datasets: dict[str, Dataset] = {
            "cache": CachedImageDataset(cache),
            "cache_stored": CachedImageDataset(cache, as_stored=True),
            "source": SourceDecodeDataset(paths, args.size),
        }
        if not args.skip_monai:
            datasets["monai"] = MonaiLoadDataset(paths, args.size)
        timings = {w: {name: images_per_second(ds, args.batch_size, w, args.min_seconds)
                       for name, ds in datasets.items()} for w in args.loader_workers}

    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load {os.getloadavg()[0]:.1f}",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "n_images": args.n, "source_side": args.side, "cache_size": args.size, "cached": summary["cached"],
        "batch_size": args.batch_size, "generate_s": round(t_generate, 2), "cache_build_s": round(t_build, 2),
        "cache_build_images_per_s": round(summary["cached"] / t_build, 1),
        "by_loader_workers": {},
    }
    print(f"cache benchmark, {results['date']}, {results['machine']}")
    print(f"{args.n} sources {args.side}x{args.side} -> cache {args.size}x{args.size}; "
          f"batch {args.batch_size}; cache build {results['cache_build_s']} s "
          f"({results['cache_build_images_per_s']} images/s, worker start-up included)")
    for w, by_name in timings.items():
        cache_rate = by_name["cache"]["images_per_s"]
        row = {f"{name}_images_per_s": round(t["images_per_s"], 1) for name, t in by_name.items()}
        row.update({f"cache_vs_{name}": round(cache_rate / t["images_per_s"], 1)
                    for name, t in by_name.items() if name in ("source", "monai")})
        results["by_loader_workers"][w] = row
        print(f"DataLoader workers {w}:")
        for name, t in by_name.items():
            ratio = f"   cache is {row[f'cache_vs_{name}']}x faster" if f"cache_vs_{name}" in row else ""
            print(f"  {name:<13}{t['images_per_s']:>10.1f} images/s  "
                  f"({t['passes']} passes, {t['seconds']:.1f} s){ratio}")
    verdicts = [f"{w} workers {r['cache_vs_source']}x {'met' if r['cache_vs_source'] >= 20 else 'NOT met'}"
                for w, r in results["by_loader_workers"].items()]
    print("target >= 20x vs source decoding: " + "; ".join(verdicts))
    return results


if __name__ == "__main__":
    main()
