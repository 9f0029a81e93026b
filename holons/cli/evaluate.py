"""`holons` subcommands. Evaluation protocols."""

from __future__ import annotations

import argparse
from pathlib import Path

from holons.cli.localize import add_evaluate_localize


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluation protocols: correspondence, few-shot segmentation, "
                       "classification, CAM localization, laterality")
    ss = p.add_subparsers(dest="protocol", required=True)
    add_evaluate_localize(ss)

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

    lat = ss.add_parser("laterality", help="linear probe on frozen features: a radiograph vs its mirror "
                        "image (accuracy, AUC with CI)")
    common(lat, "annotated set (phantoms, JSRT), a metadata.csv set, or any folder of images")
    lat.add_argument("--size", type=int, default=None,
                     help="image side in pixels (default: the foundation's recorded size, else 224)")
    lat.add_argument("--seed", type=int, default=0,
                     help="seed of the split by patient, the probe and the bootstrap")
    lat.add_argument("--test-fraction", type=float, default=0.3,
                     help="share of patients held out for testing")
    lat.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    lat.set_defaults(func=_cmd_evaluate_laterality)

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
    from holons.eval.report import compare, format_headline
    from holons.eval.weight_sets import parse_weight_specs

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


def _cmd_evaluate_laterality(args: argparse.Namespace) -> int:
    from holons.eval.laterality import format_laterality, run_laterality

    summary = run_laterality(args.weights, args.data, args.out, arch=args.arch, size=args.size,
                             seed=args.seed, test_fraction=args.test_fraction, n_boot=args.n_boot,
                             device=args.device)
    print(format_laterality(summary))
    print(f"{summary['n_train_images']} train / {summary['n_test_images']} test images (each with its "
          f"mirror) in {summary['elapsed_s']:.0f} s; results in {args.out / 'results.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``holons`` parser."""
    _add_evaluate(sub)
