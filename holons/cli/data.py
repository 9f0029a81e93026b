"""`holons` subcommands. Archive and data commands: index, cache, synth."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from holons.data.index import format_summary, index_archive, load_site_secret, require_images

    secret = load_site_secret(args.secret_file, allow_unkeyed=args.allow_unkeyed_hashes)
    summary = index_archive(
        args.archive, args.out, secret=secret,
        modalities=tuple(args.modality) if args.modality else None,
        body_parts=tuple(args.body_part) if args.body_part else None,
        min_size=args.min_size, workers=args.workers, progress=None,
    )
    require_images(summary)  # an archive without one usable image is an error, not an empty manifest
    print(format_summary(summary))
    return 0


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="decode every ok image of a manifest once into fixed-size shards")
    p.add_argument("manifest", type=Path,
                   help="manifest file (.parquet) written by `holons index`, not the archive folder")
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    p.add_argument("--size", type=int, required=True, help="side of the square cached images in pixels")
    p.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8", help="stored pixel type")
    p.add_argument("--voi", choices=["window", "percentile", "minmax"], default="window",
                   help="DICOM VOI policy used when decoding")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--split-fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                   metavar=("TRAIN", "VAL", "TEST"),
                   help="patient-level split shares (default: 0.8 0.1 0.1; with a handful of patients "
                   "use 1 0 0, an empty train split is an error)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--archive-root", type=Path, default=None,
                   help="archive folder when it moved since indexing (default: the one in the manifest)")
    p.set_defaults(func=_cmd_cache)


def _cmd_cache(args: argparse.Namespace) -> int:
    from holons.data.cache import build_cache, format_cache_summary

    summary = build_cache(
        args.manifest, args.out, size=args.size, dtype=args.dtype, voi=args.voi,
        shard_size=args.shard_size, workers=args.workers, progress=None,
        split_fractions=tuple(args.split_fractions), split_seed=args.split_seed,
        archive_root=args.archive_root,
    )
    print(format_cache_summary(summary))
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate built-in synthetic data with ground truth")
    ss = p.add_subparsers(dest="what", required=True)
    r = ss.add_parser("radiographs", help="PA chest radiograph phantoms with masks and landmarks")
    r.add_argument("--out", type=Path, required=True,
                   help="output folder (dicom/, images/, masks/, landmarks/, image_table.csv)")
    r.add_argument("--n", type=int, default=200, help="number of images")
    r.add_argument("--seed", type=int, default=0, help="generator seed (the same seed writes the same data)")
    r.add_argument("--size", type=int, default=256, help="image side in pixels")
    r.set_defaults(func=_cmd_synth_radiographs)
    # the names of lab_styles.LAB_STYLES, kept here so that --help imports no numpy (a test compares)
    styles = {
        "gband": "G-band, dark on white, tight crop (pki-3 like; the default)",
        "qband": "Q-band, bright on black, tight crop",
        "rband": "R-band: dark on white, band darkness reversed from G",
        "padded": "G-band centred in fixed 200x100 (h x w) white frames",
        "qband_padded_dim": "Q-band in fixed 200x100 black frames, dim (max ~110/255), camera noise",
        "magnified": "G-band tight crop at 1.6x the magnification",
        "jpeg": "G-band in 242x242 white frames, stored as JPEG quality 75 (.jpg)",
    }
    k = ss.add_parser("karyotypes", help="single-chromosome images of synthetic cells (G-band style)",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="lab styles (--style NAME):\n" + "\n".join(
                          f"  {name:<18}{text}" for name, text in styles.items()))
    k.add_argument("--out", type=Path, required=True,
                   help="output folder (one image per chromosome, manifest.csv, style.json)")
    k.add_argument("--cases", type=int, default=20, help="number of cells")
    k.add_argument("--seed", type=int, default=0, help="generator seed (the same seed writes the same data)")
    k.add_argument("--abnormal-rate", type=float, default=0.1, help="fraction of abnormal cells")
    k.add_argument("--flip-rate", type=float, default=0.5, help="fraction flipped to polarity 0")
    k.add_argument("--style", choices=list(styles), default=None, metavar="NAME",
                   help="how another lab's images look: " + ", ".join(styles) + " (default: gband; "
                   "described below)")
    k.set_defaults(func=_cmd_synth_karyotypes)


def _cmd_synth_radiographs(args: argparse.Namespace) -> int:
    from holons.data.synthetic.radiographs import generate_radiographs

    table = generate_radiographs(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} phantoms; image table: {table}; to pretrain, index "
          f"{args.out / 'dicom' / 'train'} (val / test are held out for evaluation)")
    return 0


def _cmd_synth_karyotypes(args: argparse.Namespace) -> int:
    from holons.data.synthetic.karyotypes import generate_karyotypes

    manifest = generate_karyotypes(
        args.out, cases=args.cases, seed=args.seed, abnormal_rate=args.abnormal_rate,
        flip_rate=args.flip_rate, style=args.style,
    )
    print(f"wrote {args.cases} cells; manifest: {manifest}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_index(sub)
    _add_cache(sub)
    _add_synth(sub)
