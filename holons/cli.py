"""The ``holons`` command line: one entry point, subcommands mirroring the Python API.

User errors (``HolonsError``) print one clear line and exit with status 2, no traceback.
Heavy modules are imported inside each command so ``holons --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from holons.errors import HolonsError


# --------------------------------------------------------------------------- index
def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="index an image archive (headers only) into a Parquet manifest")
    p.add_argument("archive", type=Path, help="root folder of the archive (DICOM, NIfTI, PNG, ...)")
    p.add_argument("--out", type=Path, required=True, help="manifest path (.parquet)")
    p.add_argument("--modality", nargs="*", default=["CR", "DX"],
                   help="DICOM modalities to keep (default: CR DX; give none to keep all)")
    p.add_argument("--body-part", nargs="*", default=None, help="DICOM BodyPartExamined values to keep")
    p.add_argument("--min-size", type=int, default=0, help="skip images with rows or cols below this")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--secret-file", type=Path, default=None,
                   help="file holding the site secret for keyed id hashes (else $HOLONS_SITE_SECRET)")
    p.add_argument("--allow-unkeyed-hashes", action="store_true",
                   help="accept unkeyed SHA-256 id hashes when no site secret is set (weaker privacy)")
    p.set_defaults(func=_cmd_index)


def _cmd_index(args: argparse.Namespace) -> int:
    from holons.data.index import format_summary, index_archive, load_site_secret

    secret = load_site_secret(args.secret_file, allow_unkeyed=args.allow_unkeyed_hashes)
    summary = index_archive(
        args.archive, args.out, secret=secret,
        modalities=tuple(args.modality) if args.modality else None,
        body_parts=tuple(args.body_part) if args.body_part else None,
        min_size=args.min_size, workers=args.workers, progress=None,
    )
    print(format_summary(summary))
    return 0


# --------------------------------------------------------------------------- cache
def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="decode every ok image of a manifest once into fixed-size shards")
    p.add_argument("manifest", type=Path, help="manifest written by `holons index`")
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    p.add_argument("--size", type=int, required=True, help="side of the square cached images in pixels")
    p.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8", help="stored pixel type")
    p.add_argument("--voi", choices=["window", "percentile", "minmax"], default="window",
                   help="DICOM VOI policy used when decoding")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args: argparse.Namespace) -> int:
    from holons.data.cache import build_cache, format_cache_summary

    summary = build_cache(
        args.manifest, args.out, size=args.size, dtype=args.dtype, voi=args.voi,
        shard_size=args.shard_size, workers=args.workers, progress=None,
    )
    print(format_cache_summary(summary))
    return 0


# --------------------------------------------------------------------------- synth
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate built-in synthetic data with ground truth")
    ss = p.add_subparsers(dest="what", required=True)
    r = ss.add_parser("radiographs", help="PA chest radiograph phantoms with masks and landmarks")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--n", type=int, default=200, help="number of images")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--size", type=int, default=256, help="image side in pixels")
    r.set_defaults(func=_cmd_synth_radiographs)
    k = ss.add_parser("karyotypes", help="single-chromosome images of synthetic cells (G-band style)")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--cases", type=int, default=20, help="number of cells")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--abnormal-rate", type=float, default=0.1, help="fraction of abnormal cells")
    k.add_argument("--flip-rate", type=float, default=0.5, help="fraction flipped to polarity 0")
    k.add_argument("--stain", choices=["gband", "qband"], default="gband")
    k.set_defaults(func=_cmd_synth_karyotypes)


def _cmd_synth_radiographs(args: argparse.Namespace) -> int:
    from holons.data.synthetic.radiographs import generate_radiographs

    table = generate_radiographs(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} phantoms; image table: {table}")
    return 0


def _cmd_synth_karyotypes(args: argparse.Namespace) -> int:
    from holons.data.synthetic.karyotypes import generate_karyotypes

    manifest = generate_karyotypes(
        args.out, cases=args.cases, seed=args.seed, abnormal_rate=args.abnormal_rate,
        flip_rate=args.flip_rate, stain=args.stain,
    )
    print(f"wrote {args.cases} cells; manifest: {manifest}")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline end to end on built-in synthetic data")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo makes")
    p.add_argument("--n", type=int, default=300, help="number of phantom radiographs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def demo_steps(out: Path, n: int = 300, seed: int = 0) -> list[tuple[str, list[str]]]:
    """The demo as a list of (title, CLI arguments): each step is a command a user could type."""
    return [
        ("synthesize chest phantoms",
         ["synth", "radiographs", "--out", str(out / "phantoms"), "--n", str(n), "--seed", str(seed)]),
        ("synthesize karyotypes",
         ["synth", "karyotypes", "--out", str(out / "karyotypes"), "--cases", "20", "--seed", str(seed)]),
        ("index the phantom archive",
         ["index", str(out / "phantoms"), "--out", str(out / "manifest.parquet"),
          "--secret-file", str(out / "site_secret.txt")]),
        ("decode once into the cache",
         ["cache", str(out / "manifest.parquet"), "--out", str(out / "cache"), "--size", "128"]),
    ]


def _cmd_demo(args: argparse.Namespace) -> int:
    import secrets
    import time

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    secret_file = out / "site_secret.txt"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32) + "\n")
        secret_file.chmod(0o600)
    t0 = time.perf_counter()
    steps = demo_steps(out, n=args.n, seed=args.seed)
    for i, (title, argv) in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] {title}: holons {' '.join(argv)}", flush=True)
        rc = main(argv)
        if rc != 0:
            print(f"demo stopped: step {i} ({title}) failed with exit status {rc}", file=sys.stderr)
            return rc
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {out.resolve()}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holons", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_index, _add_cache, _add_synth, _add_demo):
        add(sub)
    return parser


def _version() -> str:
    from holons import __version__

    return f"holons {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HolonsError as e:
        print(f"holons {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"holons {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
