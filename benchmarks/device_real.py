"""The real recipe's pretraining on a GPU machine that does not hold the shared data, evaluated here.

``real_recipe.py`` prepares the pretraining cache from ``../shared/data`` and then pretrains and evaluates
on one machine. A lent GPU machine gets only the repository (and what a call carries), not the shared
data, and may return only a few small files. This script splits the recipe there:

1. here: an earlier ``real_recipe.py --out OUT`` call (same ``--cache-size``; it may be stopped once its
   data step is logged) has made ``OUT/cache``; copy it into a git-ignored folder that travels (e.g.
   ``.device/rr_cache``) and delete that copy afterwards: it is derived from the shared data;
2. there: put the cache back at the same absolute ``OUT/cache`` (the runs' configs then equal the ones
   ``real_recipe.py`` builds here), pretrain every (method, seed) run of the recipe's settings side by side
   (``--jobs``), export the teachers, and ``--pack`` the run logs and the teachers (as float16: the transfer
   limit is 64 MiB, six float32 ConvNeXt-atto teachers are 81 MB) into a few tar files;
3. here: ``--unpack`` them into ``OUT`` (weights back to float32), then evaluate with
   ``real_recipe.py --out OUT --reuse --device cuda --eval-device cpu`` and the same settings: it finds
   every run finished with an equal config and only evaluates.

Float16 rounding changes a conv or linear weight by at most 2^-11 of its value (norms, biases and layer
scales, small and sometimes tiny, stay float32); the evaluation reads the rounded weights (stated with
the results). Every option of ``real_recipe.py`` is accepted (``--jobs`` runs that many side by side);
``--pack`` and ``--unpack`` are this script's::

    # device (repo root, cache carried in .device/rr_cache):
    mkdir -p /tmp/rr && cp -r .device/rr_cache /tmp/rr/cache
    python3 benchmarks/device_real.py --out /tmp/rr --pretrain-seeds 0 1 2 --device cuda --threads 2 \\
        --jobs 6 --pack $OUT
    # here, with the files that came back in DIR:
    .venv/bin/python benchmarks/device_real.py --out /tmp/rr --unpack DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import real_recipe  # noqa: E402

WEIGHTS_PER_TAR = 2  # two float16 ConvNeXt-atto teachers are ~13.5 MB, under the 16 MiB per-file limit


def pretrain_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every (method, seed) run of the recipe's settings (``real_recipe.pretrain_runs``: ``--jobs`` at a
    time), without the recipe's data step, which needs the shared data."""
    out: Path = args.out
    if not (out / "cache" / "cache.json").is_file():
        raise SystemExit(f"{out / 'cache'} holds no cache: copy the one real_recipe.py made there")
    started = time.perf_counter()
    done = real_recipe.pretrain_runs(args, real_recipe.run_configs(args, out / "cache"))
    runs = {f"{method}_s{seed}": info for (method, seed), info in done.items()}
    info = {"machine": {"node": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "jobs": args.jobs, "threads": args.threads, "wall_s": round(time.perf_counter() - started, 1),
            "runs": runs}
    (out / "device_runs.json").write_text(json.dumps(info, indent=2) + "\n")
    real_recipe._log(f"pretrained {len(runs)} runs in {info['wall_s']:.0f} s ({args.jobs} at a time)")
    return info


def pack(out: Path, dest: Path) -> list[Path]:
    """``dest/runs.tar`` (every run's config, metrics and log; device_runs.json) and
    ``dest/weights_<k>.tar`` (the exported teachers, matrices and kernels as float16, two per file)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    written = [dest / "runs.tar"]
    with tarfile.open(written[0], "w") as tar:
        tar.add(out / "device_runs.json", "device_runs.json")
        for run in sorted((out / "runs").iterdir()):
            for name in ("config.yaml", "metrics.jsonl", "train.log"):
                if (run / name).is_file():
                    tar.add(run / name, f"runs/{run.name}/{name}")
    weights = sorted(p for p in (out / "weights").iterdir() if (p / "model.safetensors").is_file())
    with tempfile.TemporaryDirectory() as staging:
        for k in range(0, len(weights), WEIGHTS_PER_TAR):
            path = dest / f"weights_{k // WEIGHTS_PER_TAR}.tar"
            with tarfile.open(path, "w") as tar:
                for w in weights[k:k + WEIGHTS_PER_TAR]:
                    half = {n: t.half() if t.is_floating_point() and t.ndim > 1 else t
                            for n, t in load_file(w / "model.safetensors").items()}
                    packed = Path(staging) / f"{w.name}.safetensors"
                    save_file(half, packed, metadata={"format": "pt"})
                    tar.add(packed, f"weights/{w.name}/model.safetensors")
                    tar.add(w / "config.json", f"weights/{w.name}/config.json")
            written.append(path)
    return written


def unpack(src: Path, out: Path) -> list[str]:
    """Extract what ``pack`` wrote into ``out`` (runs/, weights/ with float32 teachers); returns the
    weight folders."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.tar")):
        with tarfile.open(path) as tar:
            tar.extractall(out, filter="data")
    names = []
    for w in sorted((out / "weights").iterdir()):
        f = w / "model.safetensors"
        tensors = load_file(f)
        if any(t.dtype == torch.float16 for t in tensors.values()):
            save_file({n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}, f,
                      metadata={"format": "pt"})
        names.append(w.name)
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--pack", type=Path, default=None, help="after pretraining, write the tar files here")
    p.add_argument("--unpack", type=Path, default=None,
                   help="extract tar files from this folder into --out instead of pretraining")
    own, rest = p.parse_known_args(argv)
    args = real_recipe.parse_args(rest)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if own.unpack:
        names = unpack(own.unpack, args.out)
        real_recipe._log(f"unpacked {', '.join(names)} into {args.out}")
        return
    pretrain_all(args)
    if own.pack:
        files = pack(args.out, own.pack)
        sizes = ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files)
        real_recipe._log(f"packed {sizes}")


if __name__ == "__main__":
    main()
