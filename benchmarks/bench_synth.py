"""Speed of the built-in data generators (issue 3): chromosomes/s on one core and phantoms/s.

Reference in the same run: the time to write the same number of PNG files of the same sizes with
PIL, so the share of the rate that is file-system cost (not generation) is visible.

    python benchmarks/bench_synth.py [--seconds 5] [--cases 100] [--phantoms 60 --size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from holons.data.synthetic.karyotypes import generate_karyotypes, render_cell
from holons.data.synthetic.radiographs import generate_radiographs


def _png_write_rate(shapes: list[tuple[int, int]], folder: Path) -> float:
    """Files/s for writing uint8 PNGs of these shapes (the I/O floor of any generator)."""
    start = time.process_time()
    for i, shape in enumerate(shapes):
        Image.fromarray(np.full(shape, 255, np.uint8)).save(folder / f"{i}.png")
    return len(shapes) / max(time.process_time() - start, 1e-9)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="CPU seconds of render-only timing")
    parser.add_argument("--cases", type=int, default=100, help="cells written end to end")
    parser.add_argument("--phantoms", type=int, default=60, help="phantoms written end to end")
    parser.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    n, cpu0 = 0, time.process_time()
    while time.process_time() - cpu0 < args.seconds:
        render_cell(rng, [2] * 22 + [1, 1])
        n += 46
    render_rate = n / (time.process_time() - cpu0)

    with tempfile.TemporaryDirectory() as d:
        cpu0 = time.process_time()
        manifest = pd.read_csv(generate_karyotypes(Path(d) / "k", cases=args.cases, seed=0, workers=1,
                                                   progress=False))
        e2e_rate = len(manifest) / (time.process_time() - cpu0)
        shapes = list(zip(manifest["height"], manifest["width"], strict=True))
        (Path(d) / "png").mkdir()
        png_rate = _png_write_rate(shapes, Path(d) / "png")

        wall0 = time.perf_counter()
        generate_radiographs(Path(d) / "p", n=args.phantoms, seed=0, size=args.size, workers=2,
                             progress=False)
        phantom_wall = time.perf_counter() - wall0

    result = {
        "chromosomes_per_cpu_s_render": render_rate,
        "chromosomes_per_cpu_s_end_to_end": e2e_rate,
        "png_files_per_cpu_s_same_shapes": png_rate,
        "phantoms_per_s_wall_2_workers": args.phantoms / phantom_wall,
    }
    print(f"karyotypes, render only:      {render_rate:8.0f} chromosomes per CPU-second (target >= 2000)")
    print(f"karyotypes, files + manifest: {e2e_rate:8.0f} chromosomes per CPU-second")
    print(f"reference, blank PNG writes of the same shapes: {png_rate:8.0f} files per CPU-second "
          f"(the generator runs at {e2e_rate / png_rate:.2f} x that I/O-only rate)")
    print(f"phantoms at {args.size} px, 2 workers: {result['phantoms_per_s_wall_2_workers']:.1f}/s wall "
          f"(300 in {300 / result['phantoms_per_s_wall_2_workers']:.0f} s projected; target < 30 s)")
    return result


if __name__ == "__main__":
    main()
