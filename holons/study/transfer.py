"""Bring a study's results back from a machine with a small transfer limit: ``pack`` a folder into a few tar
files (exported weights as float16), ``unpack`` them into a folder here (weights back to float32).

``python -m holons.study.transfer pack SRC DEST`` / ``unpack SRC DEST`` (``tools/device_run.sh`` packs).
``outputs.tar`` holds the small text files (configs, logs, metrics, study records and states);
``weights_<k>.tar`` two ``model.safetensors`` (+ ``config.json``) each, conv and linear weights as
float16: at most 2^-11 relative change per element; norms, biases and layer scales stay float32.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from pathlib import Path

import torch

__all__ = ["pack", "unpack"]

WEIGHTS_PER_TAR = 2  # two float16 ConvNeXt-atto teachers are ~13.5 MB, under a 16 MiB per-file limit
TEXT = (".yaml", ".json", ".jsonl", ".log", ".md", ".csv", ".txt")
SKIP = ("pretrain_images", "cache", "phantoms", "checkpoints")  # data and bulky state stay there


def pack(src: str | Path, dest: str | Path) -> list[Path]:
    """``dest/outputs.tar`` and ``dest/weights_<k>.tar`` of the folder ``src``; returns the files written."""
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = [p for p in sorted(src.rglob("*"))
             if p.is_file() and not set(p.relative_to(src).parts) & set(SKIP)]
    written = [dest / "outputs.tar"]
    with tarfile.open(written[0], "w") as tar:
        for p in files:
            if p.suffix in TEXT and p.name != "site_secret.txt":
                tar.add(p, p.relative_to(src).as_posix())
    weights = [p for p in files if p.name == "model.safetensors"]
    with tempfile.TemporaryDirectory() as staging:
        for k in range(0, len(weights), WEIGHTS_PER_TAR):
            path = dest / f"weights_{k // WEIGHTS_PER_TAR}.tar"
            with tarfile.open(path, "w") as tar:
                for w in weights[k:k + WEIGHTS_PER_TAR]:
                    half = {n: t.half() if t.is_floating_point() and t.ndim > 1 else t
                            for n, t in load_file(w).items()}
                    packed = Path(staging) / f"{k}_{len(tar.getmembers())}.safetensors"
                    save_file(half, packed, metadata={"format": "pt"})
                    tar.add(packed, w.relative_to(src).as_posix())
            written.append(path)
    return written


def unpack(src: str | Path, dest: str | Path) -> list[Path]:
    """Extract what ``pack`` wrote in ``src`` into ``dest``; returns the weight files (now float32)."""
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names: list[Path] = []
    for path in sorted(src.glob("*.tar")):
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
            names += [dest / m.name for m in tar.getmembers() if m.name.endswith("model.safetensors")]
    for f in names:
        tensors = load_file(f)
        if any(t.dtype == torch.float16 for t in tensors.values()):
            save_file({n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}, f,
                      metadata={"format": "pt"})
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] not in ("pack", "unpack"):
        print("usage: python -m holons.study.transfer pack|unpack SRC DEST", file=sys.stderr)
        return 2
    files = (pack if argv[0] == "pack" else unpack)(argv[1], argv[2])
    print("\n".join(f"{f} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
