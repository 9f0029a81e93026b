"""The ``holons`` command line: one entry point, subcommands mirroring the Python API.

User errors (``HolonsError``) print one clear line and exit with status 2, no traceback.
Heavy modules are imported inside each command so ``holons --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
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


# --------------------------------------------------------------------------- cache
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


# --------------------------------------------------------------------------- synth
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
    # the names of karyotypes.LAB_STYLES, kept here so that --help imports no numpy (a test compares)
    styles = {
        "gband": "G-band, dark on white, tight crop (pki-3 like; the default)",
        "qband": "Q-band, bright on black, tight crop (the same as --stain qband)",
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
    k.add_argument("--stain", choices=["gband", "qband"], default=None,
                   help="gband (default) or qband; the same as --style gband / qband")
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
        flip_rate=args.flip_rate, stain=args.stain, style=args.style,
    )
    print(f"wrote {args.cases} cells; manifest: {manifest}")
    return 0


# --------------------------------------------------------------------------- demo
DEMO_KARYOGRAM_CASE = "syn00000.01"
# Bumped when the demo's folder layout changes incompatibly; version 2 pretrains on dicom/train only.
DEMO_LAYOUT_VERSION = 2


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline end to end on built-in synthetic data "
                       "(rerun to resume: finished steps are skipped)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo makes")
    p.add_argument("--n", type=int, default=300, help="number of phantom radiographs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data (phantoms and karyotypes); a rerun needs the same one")
    p.add_argument("--fast", action="store_true",
                   help="a miniature run (tiny images, a few steps; about a minute) to check the pipeline; "
                   "its numbers mean nothing")
    p.set_defaults(func=_cmd_demo)


def _configs_dir() -> Path:
    folder = Path(__file__).resolve().parent.parent / "configs"
    if not (folder / "pretrain" / "cpu_tiny.yaml").is_file():
        raise HolonsError(f"the demo needs the repository's configs folder, not found at {folder}; "
                          "run it from a source checkout (pip install -e .)")
    return folder


def demo_pretrain_archive(out: Path) -> Path:
    """The folder the demo indexes for pretraining: the phantoms' train-split DICOMs only.

    The comparison evaluates on the phantoms' val / test images, so those never reach the
    pretraining cache (the generator writes DICOMs to ``dicom/<split>/``).
    """
    return out / "phantoms" / "dicom" / "train"


def demo_steps(out: Path, n: int = 300, seed: int = 0, fast: bool = False) -> list[tuple[str, list[str]]]:
    """The demo as a list of (title, CLI arguments): each step is a command a user could type.

    Full size (about 5 minutes on 2 idle cores, longer on a busy machine): 300 phantoms of 256 px,
    the train-split ones (about 70 %) indexed and cached at 128 px, cpu_tiny pretraining (240 steps
    each for ``adamv2`` and ``dino``), the tiny karyotype config, and the comparison over 3 seeds on
    the held-out phantoms.
    ``fast`` shrinks everything to a smoke test. Pretraining always passes ``resume=true`` and an
    interrupted karyotype run gets ``--resume``, so a rerun continues.
    """
    cfg = _configs_dir()
    size, cache_size, cases = ("64", "64", "12") if fast else ("256", "128", "20")
    # The budget of benchmarks/anatomy_proof.py (240 steps per method, cpu_tiny's stage shares), at
    # which adamv2 measurably beats random init and dino on held-out phantoms.
    pretrain_extra = ["curriculum.stages=[{mode: localizability, levels: [0, 1], steps_per_level: 40}, "
                      "{mode: part_whole, levels: [0, 1], steps_per_level: 80}]"]
    if fast:
        pretrain_extra = [
            "data.batch_size=4", "model.out_dim=128", "model.head_hidden=64", "model.head_bottleneck=32",
            "views.n_local=2", "log_every=1",
            "curriculum.stages=[{mode: localizability, levels: [0], steps_per_level: 1}, "
            "{mode: part_whole, levels: [0], steps_per_level: 1}]",
        ]
    karyo_model = out / "karyotype" / "model"
    karyo_extra = ["--resume"] if karyo_model.is_dir() and any(karyo_model.iterdir()) else []
    if fast:
        karyo_extra += ["data.input_size=32", "train.gnet_epochs=1"]
    steps: list[tuple[str, list[str]]] = [
        ("synthesize chest phantoms",
         ["synth", "radiographs", "--out", str(out / "phantoms"), "--n", str(n), "--seed", str(seed),
          "--size", size]),
        ("synthesize karyotypes for training",
         ["synth", "karyotypes", "--out", str(out / "karyotypes"), "--cases", cases, "--seed", str(seed)]),
        ("synthesize new karyotypes to predict",
         ["synth", "karyotypes", "--out", str(out / "karyotypes_new"), "--cases", "3",
          "--seed", str(seed + 1), "--abnormal-rate", "0.5"]),
        ("index the phantoms' train-split DICOMs (val / test are held out for evaluation)",
         ["index", str(demo_pretrain_archive(out)), "--out", str(out / "manifest.parquet"),
          "--secret-file", str(out / "site_secret.txt")]),
        ("decode once into the cache (all of it for pretraining: the held-out split is already apart)",
         ["cache", str(out / "manifest.parquet"), "--out", str(out / "cache"), "--size", cache_size,
          "--split-fractions", "1", "0", "0"]),
    ]
    for method, config in (("adamv2", "cpu_tiny.yaml"), ("dino", "cpu_tiny_dino.yaml")):
        steps.append((f"pretrain {method} (cpu_tiny)",
                      ["pretrain", "--config", str(cfg / "pretrain" / config),
                       "--out", str(out / "runs" / method), f"data.cache_dir={out / 'cache'}", "resume=true",
                       *pretrain_extra]))
    for method in ("adamv2", "dino"):
        steps.append((f"export the {method} teacher backbone",
                      ["export", str(out / "runs" / method), "--out", str(out / "weights" / method)]))
    steps += [
        ("train the karyotype model on synthetic cells",
         ["karyotype", "train", "--config", str(cfg / "finetune" / "karyotype_cpu_tiny.yaml"),
          "--data", str(out / "karyotypes" / "manifest.csv"), "--out", str(karyo_model), *karyo_extra]),
        ("predict and dispatch the new cells",
         ["karyotype", "predict", "--model", str(karyo_model),
          "--data", str(out / "karyotypes_new" / "manifest.csv"),
          "--out", str(out / "karyotype" / "predictions")]),
        ("draw a karyogram",
         ["karyotype", "karyogram", "--predictions", str(out / "karyotype" / "predictions"),
          "--case", DEMO_KARYOGRAM_CASE,
          "--out", str(out / "karyotype" / f"karyogram_{DEMO_KARYOGRAM_CASE}.png")]),
        ("compare random / dino / adamv2: correspondence, few-shot segmentation -> report",
         ["evaluate", "compare", "--weights", "random", f"dino={out / 'weights' / 'dino'}",
          f"adamv2={out / 'weights' / 'adamv2'}", "--runs", f"dino={out / 'runs' / 'dino'}",
          f"adamv2={out / 'runs' / 'adamv2'}", "--data", str(out / "phantoms"), "--out", str(out / "report"),
          "--seeds", *(["0", "1"] if fast else ["0", "1", "2"]), *(["--fast"] if fast else [])]),
    ]
    return steps


def _step_key(argv: list[str]) -> list[str]:
    """What identifies a finished step: its arguments without the resume flag added on reruns."""
    return [a for a in argv if a != "--resume"]


def _step_output(argv: list[str]) -> Path | None:
    return Path(argv[argv.index("--out") + 1]) if "--out" in argv else None


def _load_demo_state(path: Path, settings: dict) -> dict:
    """The demo's record of finished steps; a folder made with other settings is refused."""
    import json

    if not path.is_file():
        return {"settings": settings, "done": []}
    try:
        state = json.loads(path.read_text())
        done = [list(map(str, a)) for a in state["done"]]
    except (ValueError, KeyError, TypeError):
        return {"settings": settings, "done": []}
    made_with = state.get("settings") or {}
    if made_with.get("layout") != settings.get("layout"):
        raise HolonsError(f"{path.parent} holds a demo made by another holons version with another folder "
                          "layout; use another --out or delete that folder")
    if made_with != settings:
        made = ", ".join(f"{k} {v}" for k, v in made_with.items() if k != "layout")
        raise HolonsError(f"{path.parent} holds a demo made with other settings ({made}); "
                          "use another --out or delete that folder")
    return {"settings": settings, "done": done}


def _demo_summary(out: Path) -> str:
    """The closing table: the comparison's headline numbers and the karyotyping results."""
    import json

    from holons.eval.report import format_headline

    lines = []
    summary_file = out / "report" / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        lines += ["foundation weights (phantoms; mean ± sd over seeds):", format_headline(summary)]
    metrics_file = out / "karyotype" / "model" / "eval" / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        lines.append(f"karyotyping (held-out synthetic cells, {m.get('test_chromosomes', '?')} chromosomes): "
                     f"type accuracy {m.get('type_accuracy', float('nan')):.3f}, polarity "
                     f"{m.get('polarity_accuracy', float('nan')):.3f}, per case with optimal dispatch "
                     f"{m.get('case_accuracy_optimal', float('nan')):.3f}")
    cases = sorted((out / "karyotype" / "predictions" / "cases").glob("*.json"))
    if cases:
        warned = []
        for c in cases:
            record = json.loads(c.read_text())
            if record.get("warnings"):
                warned.append(f"{c.stem}: {'; '.join(map(str, record['warnings']))}")
        lines.append(f"new cells predicted: {len(cases)}, with warnings: {len(warned)}"
                     + "".join(f"\n  {w}" for w in warned))
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    import hashlib
    import json
    import shlex
    import time

    from holons.files import atomic_write

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "demo_state.json"
    state = _load_demo_state(state_file, {"n": args.n, "seed": args.seed, "fast": args.fast,
                                          "layout": DEMO_LAYOUT_VERSION})
    secret_file = out / "site_secret.txt"
    if not secret_file.exists():
        # The demo's data are synthetic, so its "site secret" is derived from the seed: the
        # pseudonyms, and with them the cache's patient-level splits, are then reproducible.
        # A real site uses a random secret kept outside the data (see `holons index --help`).
        secret_file.write_text(hashlib.sha256(f"holons-demo-site-{args.seed}".encode()).hexdigest() + "\n")
        secret_file.chmod(0o600)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    steps = demo_steps(out, n=args.n, seed=args.seed, fast=args.fast)
    times: list[tuple[str, str]] = []
    for i, (title, argv) in enumerate(steps, 1):
        target = _step_output(argv)
        key = _step_key(argv)
        if key in state["done"] and (target is None or target.exists()):
            print(f"\n[{i}/{len(steps)}] {title}: done in an earlier run, skipped", flush=True)
            times.append((title, "skipped"))
            continue
        print(f"\n[{i}/{len(steps)}] {title}:\n  holons {shlex.join(argv)}", flush=True)
        t1 = time.perf_counter()
        rc = main(argv)
        if rc != 0:
            print(f"demo stopped: step {i} ({title}) failed with exit status {rc}; fix the cause and rerun "
                  "`holons demo` with the same arguments to continue from this step", file=sys.stderr)
            return rc
        times.append((title, f"{time.perf_counter() - t1:.0f} s"))
        state["done"] = [a for a in state["done"] if a != key] + [key]
        with atomic_write(state_file, "w") as f:
            json.dump(state, f, indent=1)
    width = max(len(t) for t, _ in times)
    print("\nsteps:")
    for title, took in times:
        print(f"  {title.ljust(width)}  {took:>8}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s (load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs); outputs in {out.resolve()}")
    print(_demo_summary(out))
    report = (out / "report").resolve()
    print(f"\nreport: {report / 'report.md'}  (plots in {report / 'plots'})")
    return 0


# --------------------------------------------------------------------------- pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining of a foundation backbone "
                       "(multi-GPU: torchrun --nproc_per_node N -m holons pretrain ...)")
    p.add_argument("--config", type=Path, required=True,
                   help="YAML config, e.g. configs/pretrain/cpu_tiny.yaml")
    p.add_argument("--out", type=Path, required=True,
                   help="run dir (one holding a checkpoint is refused unless resume=true or overwrite=true; "
                   "the leftovers of a run that stopped before its first checkpoint are cleared)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. resume=true data.cache_dir=cache optim.lr=1e-3")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from holons.ssl.trainer import pretrain

    result = pretrain(args.config, args.out, args.overrides)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if result.status == "terminated":  # exit like the signal (143 SIGTERM, 130 SIGINT): the run is not done
        name = signal.Signals(result.signum).name
        print(f"stopped by {name} at step {result.step}/{result.total_steps}; checkpoint written; "
              f"continue with: holons pretrain --config {args.config} --out {args.out} resume=true",
              file=sys.stderr)
        return 128 + result.signum
    elif result.status == "stopped":
        print(f"stopped at max_steps: step {result.step}/{result.total_steps}; run dir {args.out}")
    else:
        print(f"pretraining finished: {result.step} steps, {result.nan_steps} skipped (non-finite loss); "
              f"run dir {args.out}, teacher exported to {args.out / 'exported'}")
    return 0


# --------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's backbone as timm-loadable "
                       "model.safetensors + config.json")
    p.add_argument("run", type=Path, help="run dir written by `holons pretrain` (or a checkpoint file)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/exported)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="which backbone to export (default: the EMA teacher)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from holons.ssl.export import export

    run, checkpoint = (args.run.parent.parent, args.run) if args.run.is_file() else (args.run, None)
    out = export(run, args.out, which=args.which, checkpoint=checkpoint)
    print(f"exported the {args.which} backbone to {out} (load with timm.create_model('local-dir:{out}', "
          "pretrained=True))")
    return 0


# --------------------------------------------------------------------------- karyotype
def _add_karyotype(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("karyotype", help="chromosome karyotyping: train, fit a learned dispatcher, predict "
                       "per case, karyogram")
    ks = p.add_subparsers(dest="action", required=True)
    t = ks.add_parser("train", help="train the Varifocal G-Net / L-Net and evaluate it on the test split")
    t.add_argument("--config", type=Path, default=None,
                   help="YAML config (configs/finetune/karyotype_*.yaml)")
    t.add_argument("--data", type=Path, required=True,
                   help="manifest CSV (pki-3, karyonet or synthetic layout)")
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    t.set_defaults(func=_cmd_karyotype_train)
    r = ks.add_parser("predict", help="predict types and polarity, dispatch per case")
    r.add_argument("--model", type=Path, required=True, help="model folder (or the training run folder)")
    r.add_argument("--data", type=Path, required=True,
                   help="manifest CSV or folder of images (one folder per case)")
    r.add_argument("--out", type=Path, required=True, help="folder for predictions.csv and cases/*.json")
    r.add_argument("--dispatch", choices=["auto", "none", "greedy", "optimal", "learned",
                                          "learned_then_optimal"], default="auto",
                   help="per-case consistency rule for dispatched_class_1to24: auto (default: "
                        "learned_then_optimal when the model has a learned dispatcher, else optimal), "
                        "optimal assignment to the 46 slots, the paper's greedy rule, none (each "
                        "chromosome's top type), learned (the model's learned per-cell dispatcher, see "
                        "fit-dispatch) or learned_then_optimal (the optimal assignment on its output)")
    r.add_argument("--batch-size", type=int, default=256,
                   help="chromosomes per forward pass (memory only; the predictions do not depend on it)")
    r.set_defaults(func=_cmd_karyotype_predict)
    d = ks.add_parser("fit-dispatch", help="train a run's learned per-cell dispatcher and compare it with "
                      "the rule-based dispatch on the test split")
    d.add_argument("--run", type=Path, required=True, help="run folder written by `karyotype train`")
    d.add_argument("--data", type=Path, required=True, metavar="MANIFEST",
                   help="the manifest CSV the run was trained on (its split.csv rows are looked up in it)")
    d.add_argument("--steps", type=int, default=600, help="optimizer steps of the dispatcher (default 600)")
    d.add_argument("--seed", type=int, default=0, help="seed of the dispatcher's training (default 0)")
    d.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    d.set_defaults(func=_cmd_karyotype_fit_dispatch)
    g = ks.add_parser("karyogram", help="draw one case's karyogram from predictions")
    g.add_argument("--predictions", type=Path, required=True, help="folder written by `karyotype predict`")
    g.add_argument("--case", required=True, help="case id")
    g.add_argument("--out", type=Path, required=True, help="PNG file")
    g.set_defaults(func=_cmd_karyotype_karyogram)


def _cmd_karyotype_train(args: argparse.Namespace) -> int:
    import json
    import shlex

    from holons.config import load_config
    from holons.finetune.karyotype.config import KaryotypeConfig
    from holons.finetune.karyotype.train import KaryotypeInterrupted, train_karyotype

    cfg = load_config(KaryotypeConfig, args.config, args.overrides)
    try:
        summary = train_karyotype(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite)
    except KaryotypeInterrupted as e:  # state saved; exit like the signal (143 SIGTERM, 130 SIGINT)
        command = ["holons", "karyotype", "train"] + (["--config", str(args.config)] if args.config else [])
        command += ["--data", str(args.data), "--out", str(args.out), "--resume", *args.overrides]
        print(f"holons karyotype train: {e}\ncontinue with: {shlex.join(command)}", file=sys.stderr)
        return 128 + e.signum
    print(json.dumps({k: v for k, v in summary.items() if k != "confusion"}, indent=2))
    return 0


def _cmd_karyotype_predict(args: argparse.Namespace) -> int:
    from holons.finetune.karyotype.predict import predict_karyotypes

    summary = predict_karyotypes(args.model, args.data, args.out, dispatch=args.dispatch,
                                 batch_size=args.batch_size)
    print(f"predicted {summary['chromosomes']} chromosomes in {summary['cases']} cases "
          f"({summary['skipped']} unreadable, {summary['cases_with_warnings']} cases with warnings); "
          f"wrote {args.out / 'predictions.csv'}")
    if "metrics" in summary:
        m, method = summary["metrics"], summary["dispatch"]
        print(f"labelled manifest: type accuracy {m['type_accuracy']:.4f}, dispatched ({method}) "
              f"{m[f'type_accuracy_{method}']:.4f}, per case {m[f'case_accuracy_{method}']:.4f} "
              f"(all metrics in {args.out / 'metrics.json'})")
    return 0


def _cmd_karyotype_fit_dispatch(args: argparse.Namespace) -> int:
    from holons.finetune.karyotype.fit_dispatch import REPORT_FILE, fit_learned_dispatch, format_report

    report = fit_learned_dispatch(args.run, args.data, steps=args.steps, seed=args.seed, device=args.device)
    print(format_report(report))
    print(f"saved the dispatcher into the model folder; wrote {args.run / 'eval' / REPORT_FILE} "
          "(use it with `holons karyotype predict --dispatch learned`)")
    return 0


def _cmd_karyotype_karyogram(args: argparse.Namespace) -> int:
    from holons.finetune.karyotype.karyogram import karyogram_from_predictions

    karyogram_from_predictions(args.predictions, args.case, args.out)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluation protocols: correspondence, few-shot segmentation, "
                       "classification, CAM localization")
    ss = p.add_subparsers(dest="protocol", required=True)

    def common(q: argparse.ArgumentParser, data_help: str) -> None:
        q.add_argument("--weights", required=True,
                       help="exported foundation folder (model.safetensors + config.json), or 'random'")
        q.add_argument("--arch", default=None, help="timm architecture (required with --weights random)")
        q.add_argument("--init-seed", type=int, default=0,
                       help="seed of the random init of --weights random (a rerun evaluates the same model)")
        q.add_argument("--data", type=Path, required=True, help=data_help)
        q.add_argument("--out", type=Path, required=True, help="output folder (results.json + CSV)")
        q.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")

    annotated = "annotated set in the JSRT/SCR layout (JSRT jsrt_scr or `holons synth radiographs` output)"
    c = ss.add_parser("correspondence", help="zero-shot landmark matching with dense features; part-whole "
                      "consistency")
    common(c, annotated)
    c.add_argument("--size", type=int, default=256, help="evaluation frame side in pixels")
    c.add_argument("--pairs", type=int, default=20, help="number of (source, target) image pairs")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the pair draw (and of the random wholes of part-whole consistency)")
    c.add_argument("--split", default="auto", help="images to pair: a split name, or auto (test, else val)")
    c.add_argument("--radii", type=float, nargs="+", default=[10.0, 20.0, 40.0],
                   help="PCK radii in pixels of the images' own frame (1024 for JSRT)")
    c.add_argument("--random-wholes", type=int, default=0,
                   help="part-whole consistency also on this many random half-side wholes per image")
    c.add_argument("--no-part-whole", action="store_true", help="skip part-whole consistency")
    c.add_argument("--stages", type=int, default=1,
                   help="match on the last N feature stages concatenated (1: last stage only)")
    c.set_defaults(func=_cmd_evaluate_correspondence)

    f = ss.add_parser("fewshot-seg", help="few-shot segmentation (Dice per structure) with a U-Net decoder")
    common(f, annotated)
    f.add_argument("--shots", type=int, nargs="+", default=[3, 6, 12, 24], help="labelled images per run")
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one run per seed and shot count: the seed draws the support images and the decoder "
                   "init (default: 0 1 2)")
    f.add_argument("--modes", nargs="+", choices=["frozen", "finetune"], default=["frozen", "finetune"],
                   help="frozen: train the decoder on fixed features; finetune: train the encoder too "
                   "(default: both)")
    f.add_argument("--size", type=int, default=128, help="image side in pixels")
    f.add_argument("--steps", type=int, default=None,
                   help="decoder training steps per run (default: 240, enough to fit the support set)")
    f.add_argument("--batch-size", type=int, default=8, help="support images per decoder step")
    f.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many images")
    f.set_defaults(func=_cmd_evaluate_fewshot)

    k = ss.add_parser("classify", help="kNN, linear probe and fine-tuning at label fractions (AUC with CIs)")
    common(k, "phantom set (cardiomegaly, nodule) or a metadata.csv set with finding (e.g. covid_chestxray)")
    k.add_argument("--protocols", nargs="+", choices=["knn", "linear", "finetune"],
                   default=["knn", "linear", "finetune"],
                   help="kNN on frozen features, linear probe, full fine-tuning (default: all three)")
    k.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="label fractions")
    k.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed: the seed draws the labelled subset and the training (default: 0)")
    k.add_argument("--size", type=int, default=128, help="image side in pixels")
    k.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run")
    k.add_argument("--k", type=int, default=20, help="neighbours of the kNN classifier")
    k.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    k.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for AUC intervals")
    k.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of patients held out where the set has no split column")
    k.set_defaults(func=_cmd_evaluate_classify)

    g = ss.add_parser("cam", help="CAM localization of findings (MaxBoxAccV2 against the data prior)")
    common(g, "phantom set (nodule, cardiomegaly) or JSRT jsrt_scr (nodule)")
    g.add_argument("--tasks", nargs="+", default=None, help="findings to localize (default: all of the set)")
    g.add_argument("--size", type=int, default=256, help="image side in pixels")
    g.add_argument("--seed", type=int, default=0, help="seeds a random init (the probe is deterministic)")
    g.set_defaults(func=_cmd_evaluate_cam)

    m = ss.add_parser("compare", help="several weight sets side by side (random init always): "
                      "correspondence, few-shot segmentation [, classification, CAM] over seeds -> report")
    m.add_argument("--weights", nargs="+", required=True, metavar="NAME=DIR_OR_random",
                   help="weight sets: NAME=exported folder, NAME=random, or a bare folder / 'random'")
    m.add_argument("--runs", nargs="*", default=[], metavar="NAME=RUNDIR",
                   help="pretraining run dirs for the loss curves (found by itself for RUN/exported)")
    m.add_argument("--data", type=Path, required=True, help=annotated)
    m.add_argument("--out", type=Path, required=True, help="report folder (report.md, plots/, summary.json)")
    m.add_argument("--arch", default=None, help="timm architecture (default: the exported folders' one)")
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="evaluation seeds: each runs every protocol for every weight set (and draws that "
                   "seed's random init); the report gives mean ± sd over them (default: 0 1 2)")
    m.add_argument("--fast", action="store_true", help="tiny settings for smoke tests (numbers meaningless)")
    m.add_argument("--classify", action="store_true", help="also classify the phantom findings (kNN, linear)")
    m.add_argument("--classify-data", type=Path, default=None,
                   help="set for classification (default: --data); implies --classify")
    m.add_argument("--cam", action="store_true",
                   help="also score CAM localization of the findings on --data (MaxBoxAccV2)")
    m.add_argument("--pairs", type=int, default=None, help="correspondence pairs per seed (default: 10)")
    m.add_argument("--corr-size", type=int, default=None, help="correspondence frame, pixels (default: 128)")
    m.add_argument("--shots", type=int, nargs="+", default=None, help="few-shot sizes (default: 6)")
    m.add_argument("--seg-size", type=int, default=None, help="few-shot image side in pixels (default: 96)")
    m.add_argument("--modes", nargs="+", choices=["frozen", "finetune"], default=None,
                   help="few-shot encoder modes (default: frozen)")
    m.add_argument("--fewshot-steps", type=int, default=None,
                   help="few-shot decoder steps (default: 40, sized for the demo; 240, the fewshot-seg "
                        "default, lets the decoder fit its support set: use it for studies)")
    m.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    m.set_defaults(func=_cmd_evaluate_compare)


def _cmd_evaluate_correspondence(args: argparse.Namespace) -> int:
    from holons.eval.correspondence import format_correspondence, run_correspondence

    summary = run_correspondence(
        args.weights, args.data, args.out, arch=args.arch, size=args.size, pairs=args.pairs, seed=args.seed,
        split=None if args.split == "all" else args.split, radii=tuple(args.radii),
        part_whole=not args.no_part_whole, random_wholes=args.random_wholes, stages=args.stages,
        device=args.device,
    )
    print(format_correspondence(summary))
    print(f"{summary['pairs']} pairs in {summary['elapsed_s']:.0f} s; results in {args.out / 'results.json'}")
    return 0


def _cmd_evaluate_fewshot(args: argparse.Namespace) -> int:
    from holons.eval.fewshot_seg import format_fewshot, run_fewshot_segmentation

    summary = run_fewshot_segmentation(
        args.weights, args.data, args.out, arch=args.arch, shots=tuple(args.shots), seeds=tuple(args.seeds),
        modes=tuple(args.modes), size=args.size, batch_size=args.batch_size,
        max_eval=args.max_eval, device=args.device, **({} if args.steps is None else {"steps": args.steps}),
    )
    print(format_fewshot(summary))
    print(f"Dice on {summary['eval_images']} {summary['eval_split']} images in {summary['elapsed_s']:.0f} s; "
          f"results in {args.out / 'results.json'}")
    return 0


def _cmd_evaluate_compare(args: argparse.Namespace) -> int:
    from holons.errors import ConfigError
    from holons.eval.report import compare, format_headline, parse_weight_specs

    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--runs takes NAME=RUNDIR, got {spec!r}")
        runs[name] = Path(path)
    protocols = ["correspondence", "fewshot-seg"]
    if args.classify or args.classify_data:
        protocols.append("classify")
    if args.cam:
        protocols.append("cam")

    def given(*pairs: tuple[str, object]) -> dict:
        return {k: v for k, v in pairs if v is not None}

    settings = {
        "correspondence": given(("pairs", args.pairs), ("size", args.corr_size)),
        "fewshot-seg": given(("shots", args.shots and tuple(args.shots)),
                             ("modes", args.modes and tuple(args.modes)), ("steps", args.fewshot_steps),
                             ("size", args.seg_size)),
    }
    summary = compare(parse_weight_specs(args.weights), args.data, args.out, runs=runs, arch=args.arch,
                      seeds=tuple(args.seeds), protocols=protocols, classify_data=args.classify_data,
                      fast=args.fast, settings=settings, device=args.device,
                      log=lambda line: print(line, flush=True))
    print(format_headline(summary))
    print(f"report: {summary['report']} ({summary['elapsed_s']:.0f} s)")
    return 0


def _cmd_evaluate_classify(args: argparse.Namespace) -> int:
    from holons.eval.classify import format_classification, run_classification

    summary = run_classification(
        args.weights, args.data, args.out, arch=args.arch, test_fraction=args.test_fraction,
        protocols=tuple(args.protocols), fractions=tuple(args.fractions), seeds=tuple(args.seeds),
        size=args.size, steps=args.steps, k=args.k, temperature=args.temperature, n_boot=args.n_boot,
        device=args.device,
    )
    print(format_classification(summary))
    print(f"{summary['n_train']} train / {summary['n_test']} test images in {summary['elapsed_s']:.0f} s; "
          f"results in {args.out / 'results.json'}")
    return 0


def _cmd_evaluate_cam(args: argparse.Namespace) -> int:
    from holons.eval.localization import format_localization, run_localization

    summary = run_localization(args.weights, args.data, args.out, arch=args.arch, seed=args.seed,
                               device=args.device, size=args.size, tasks=args.tasks)
    print(format_localization(summary))
    print(f"{summary['n_train']} train / {summary['n_test']} test images in {summary['elapsed_s']:.0f} s; "
          f"results in {args.out / 'results.json'}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holons", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_index, _add_cache, _add_synth, _add_demo, _add_pretrain, _add_export, _add_karyotype,
                _add_evaluate):
        add(sub)
    return parser


def _version() -> str:
    from holons import __version__

    return f"holons {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "init_seed", None) is not None and getattr(args, "weights", None) == "random":
        import torch

        torch.manual_seed(args.init_seed)
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
