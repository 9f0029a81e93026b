"""API steps of the shipped studies (``configs/studies/*.yaml``): ``{call: "holons.study.steps:NAME"}``.

Each one is safe to run again after a stop: a finished result with the same settings is reused, an
interrupted pretraining or karyotype run continues from its last checkpoint.

- ``prepare_phantoms``: synthetic radiographs, and a pretraining cache of their train patients only;
- ``prepare_radiographs``: the real chest radiographs of the shared data as an unlabeled pretraining
  cache (JSRT train split only: its val images are the evaluation set);
- ``pretrain_for_steps``: a pretraining config with its curriculum rewritten to a step budget;
- ``evaluate_weights``: ``holons.eval.report.compare`` of one weight set, its means over evaluation
  seeds written to ``metrics.json``;
- ``karyotype_train``: ``train_karyotype`` with reuse / resume;
- ``select_rows``: the rows of a manifest with one column value (e.g. karyonet's G-band images), paths
  made absolute so that the shared data folder stays read-only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from holons.errors import HolonsError
from holons.files import atomic_write, shared_data_root

__all__ = ["prepare_phantoms", "prepare_radiographs", "pretraining_sources", "rewrite_curriculum",
           "curriculum_steps", "budget_config", "comparable_config", "pretrain_for_steps", "evaluate_weights",
           "karyotype_train", "select_rows", "data_path"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
JSRT = "jsrt_scr"


def data_path(path: str | Path) -> Path:
    """``path`` as given when it exists, else relative to the shared data folder (``$HOLONS_DATA``)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    root = shared_data_root()
    if root is None or not (root / p).exists():
        raise HolonsError(f"{path} not found here nor under the shared data folder (set HOLONS_DATA)")
    return root / p


# --------------------------------------------------------------------------- data
def _clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare_phantoms(out: str, n: int, size: int, seed: int, cache_size: int) -> None:
    """``OUT/phantoms`` (``n`` phantoms of ``size`` px, split by patient), ``OUT/manifest.parquet`` and
    ``OUT/cache`` built from ``phantoms/dicom/train`` alone; refuses a cache holding a held-out image."""
    from holons.data.cache import build_cache
    from holons.data.index import index_archive
    from holons.data.synthetic.radiographs import generate_radiographs

    root = Path(out)
    phantoms = root / "phantoms"
    _clear(phantoms, root / "cache", root / "manifest.parquet")
    generate_radiographs(phantoms, n=n, seed=seed, size=size, formats=("dicom", "png"), progress=False)
    index_archive(phantoms / "dicom" / "train", root / "manifest.parquet", secret=b"anatomy-proof",
                  modalities=None, progress=False)
    build_cache(root / "manifest.parquet", root / "cache", size=cache_size, progress=False,
                split_fractions=(1.0, 0.0, 0.0))
    table = pd.read_csv(phantoms / "image_table.csv", dtype=str, keep_default_na=False)
    cached = {Path(p).stem for p in pd.read_parquet(root / "cache" / "index.parquet")["path"]}
    leaked = sorted(cached - set(table.loc[table["split"] == "train", "id"]))
    if leaked:
        raise HolonsError(f"the pretraining cache holds non-train images: {leaked[:3]}")


def pretraining_sources(radiographs: Path) -> list[tuple[str, Path, str]]:
    """(source, absolute file, relative destination) of every unlabeled pretraining image: JSRT's train
    split, covid_chestxray's frontal X-rays, every image of figure1_covid, actualmed_covid, txv_samples."""
    files: list[tuple[str, Path, str]] = []
    jsrt = radiographs / JSRT
    table = pd.read_csv(jsrt / "image_table.csv", dtype=str, keep_default_na=False)
    for image_id in table.loc[table["hybridgnet_split"] == "train", "image"]:
        files.append(("jsrt_train", jsrt / "images_1024" / f"{image_id}.png", f"jsrt_train/{image_id}.png"))
    covid = radiographs / "covid_chestxray"
    meta = pd.read_csv(covid / "metadata.csv", dtype=str, keep_default_na=False)
    frontal = meta[(meta["view"].str.upper() != "L") & (meta["modality"].str.lower() == "x-ray")]
    for name in sorted(set(frontal["filename"])):
        if (covid / "images" / name).is_file():
            files.append(("covid_chestxray", covid / "images" / name, f"covid_chestxray/{name}"))
    for source in ("figure1_covid", "actualmed_covid", "txv_samples"):
        root = radiographs / source
        if root.is_dir():
            files += [(source, f, f"{source}/{f.relative_to(root).as_posix()}")
                      for f in sorted(root.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return files


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # `holons index` does not follow symbolic links
    except OSError:
        shutil.copy2(src, dst)


def prepare_radiographs(out: str, cache_size: int, data_root: str | None = None) -> None:
    """The real pretraining set under ``OUT``: hard links in ``pretrain_images/``, a generated site secret,
    ``manifest.parquet`` and ``cache/`` (every cached image a training image); ``OUT/data.json`` holds
    counts per source only (file names can hold raw identifiers). Refuses a cache with a JSRT val image."""
    from holons.data.cache import build_cache
    from holons.data.index import index_archive

    root = Path(out)
    radiographs = Path(data_root) / "radiographs" if data_root else data_path("radiographs")
    if not (radiographs / JSRT / "image_table.csv").is_file():
        raise HolonsError(f"{radiographs} holds no {JSRT}/image_table.csv")
    images, manifest, cache = root / "pretrain_images", root / "manifest.parquet", root / "cache"
    _clear(images, cache, manifest, manifest.with_name(manifest.name + ".parts"))
    files = pretraining_sources(radiographs)
    for _, src, rel in files:
        _link_or_copy(src, images / rel)
    secret_file = root / "site_secret.txt"
    if not secret_file.exists():
        with atomic_write(secret_file, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        secret_file.chmod(0o600)
    index_archive(images, manifest, secret=secret_file.read_bytes().strip(), modalities=None, progress=False)
    build_cache(manifest, cache, size=cache_size, progress=False, split_fractions=(1.0, 0.0, 0.0))
    cached = pd.read_parquet(cache / "index.parquet")
    table = pd.read_csv(radiographs / JSRT / "image_table.csv", dtype=str, keep_default_na=False)
    held_out = set(table.loc[table["hybridgnet_split"] != "train", "image"])
    leaked = {Path(p).stem for p in cached["path"] if Path(p).parts[0] == "jsrt_train"} & held_out
    if leaked or not held_out:
        raise HolonsError(f"the pretraining cache holds {len(leaked)} JSRT evaluation images"
                          if leaked else "the JSRT table has no held-out (val) images to evaluate on")
    per_source = cached["path"].map(lambda p: Path(p).parts[0]).value_counts().sort_index()
    with atomic_write(root / "data.json", "w") as f:
        json.dump({"linked_images": len(files), "cached_images": int(len(cached)), "cache_size": cache_size,
                   "cached_per_source": {k: int(v) for k, v in per_source.items()}}, f, indent=2)


# --------------------------------------------------------------------------- pretraining
def rewrite_curriculum(cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    """Give every curriculum stage its configured share (``epochs_per_level`` or ``steps_per_level`` times
    its number of levels) of ``steps`` as whole ``steps_per_level``; ``max_steps`` is cleared."""
    stages = cfg.get("curriculum", {}).get("stages") or [{"mode": "localizability", "levels": [0]}]
    per_level = [float(st.get("epochs_per_level") or st.get("steps_per_level") or 1.0) for st in stages]
    total = sum(w * len(st.get("levels", [0, 1, 2])) for w, st in zip(per_level, stages, strict=True))
    cfg.setdefault("curriculum", {})["stages"] = [
        {"mode": st.get("mode", "part_whole"), "levels": list(st.get("levels", [0, 1, 2])),
         "steps_per_level": max(1, round(steps * w / total))}
        for w, st in zip(per_level, stages, strict=True)]
    cfg["max_steps"] = None
    return cfg


def curriculum_steps(cfg: dict[str, Any]) -> int:
    """Optimizer steps of a rewritten curriculum."""
    return sum(st["steps_per_level"] * len(st["levels"]) for st in cfg["curriculum"]["stages"])


def budget_config(config: str | Path, steps: int, seed: int, cache: str | Path | None, *,
                  device: str = "auto", batch_size: int | None = None,
                  overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML ``config`` < the run's seed, device, cache (train split) and batch < ``overrides``, its
    curriculum rewritten to ``steps`` (``method: dino`` collapses it into one stage of that length).
    ``cache=None`` keeps the config's data source."""
    from holons.config import merge_config, parse_overrides

    cfg = yaml.safe_load(Path(config).read_text())
    run: dict[str, Any] = {"seed": seed, "device": device, "data": {}}
    if cache is not None:
        run["data"].update(cache_dir=str(cache), split="train")
    if batch_size:
        run["data"]["batch_size"] = batch_size
    merged = merge_config(merge_config(cfg, run), parse_overrides(list(overrides or [])))
    return rewrite_curriculum(merged, steps)


def comparable_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without bookkeeping keys: equal means a run can be reused or resumed."""
    from holons.config import load_config, to_dict
    from holons.ssl.config import PretrainConfig

    d = to_dict(load_config(PretrainConfig, None, cfg))
    for key in ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        d.pop(key, None)
    return d


def pretrain_for_steps(config: str, run: str, steps: int, seed: int, cache: str | None, device: str = "auto",
                       batch_size: int | None = None, overrides: list[str] | None = None,
                       max_steps: int | None = None) -> Any:
    """Pretrain ``budget_config(...)`` into ``run`` (teacher exported to ``RUN/exported``). A finished run
    of the same config is reused; an interrupted one continues from its last checkpoint; a run of another
    config starts over. ``max_steps`` stops early (a test of resuming). Exits 128 + signal when stopped."""
    from holons.runs import latest_checkpoint
    from holons.ssl.trainer import pretrain

    cfg = budget_config(config, steps, seed, cache, device=device, batch_size=batch_size, overrides=overrides)
    run_dir, previous = Path(run), Path(run) / "config.yaml"
    same = (previous.is_file()
            and comparable_config(yaml.safe_load(previous.read_text())) == comparable_config(cfg))
    if same and (run_dir / "exported" / "model.safetensors").is_file():
        print(f"{run_dir.name}: finished with this config; reused", flush=True)
        return None
    resume = same and latest_checkpoint(run_dir / "checkpoints") is not None
    if max_steps is not None:
        cfg["max_steps"] = max_steps
    result = pretrain(cfg, run_dir, progress=False, resume=resume, overwrite=not resume)
    if result.status == "terminated":
        raise SystemExit(128 + result.signum)
    if result.status != "finished" and max_steps is None:
        raise HolonsError(f"pretraining {run_dir.name} ended {result.status} at step {result.step}")
    return result


# --------------------------------------------------------------------------- evaluation
def evaluate_weights(weights: str, out: str, data: str, arch: str, seeds: list[int], protocols: list[str],
                     settings: dict[str, dict[str, Any]], device: str = "auto", name: str = "model") -> None:
    """``compare`` of ``weights`` (an exported folder or "random") alone on ``data`` (a path, or one under
    the shared data folder), then ``OUT/metrics.json``: ``{protocol: {metric: {setting: mean over seeds}}}``
    (``OUT/summary.json`` keeps the sds and per-seed values)."""
    from holons.eval.report import compare

    settings = {p: {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}
                for p, s in settings.items()}
    summary = compare({name: weights}, data_path(data), out, arch=arch, seeds=seeds, protocols=protocols,
                      settings=settings, device=None if device == "auto" else device, with_random=False)
    nested: dict[str, Any] = {}
    for row in summary["table"]:
        nested.setdefault(row["protocol"], {}).setdefault(row["metric"], {})[row["setting"]] = row["mean"]
    with atomic_write(Path(out) / "metrics.json", "w") as f:
        json.dump(nested, f, indent=2)


# --------------------------------------------------------------------------- karyotyping
def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def karyotype_train(config: str, manifest: str, out: str, overrides: list[str] | None = None) -> None:
    """``train_karyotype`` of ``config`` < ``overrides`` into ``out``: a finished run of the same config is
    reused (one of another config is refused), an interrupted one resumes from its checkpoints, one that
    stopped before its first checkpoint starts over. Exits 128 + signal when stopped."""
    from holons.config import load_config, to_dict
    from holons.finetune.karyotype.config import KaryotypeConfig
    from holons.finetune.karyotype.train import KaryotypeInterrupted, train_karyotype

    unset = [o for o in overrides or [] if o.partition("=")[2] in ("None", "null", "")]
    if unset:
        raise HolonsError(f"override {unset[0]!r} has no value: set the study variable it names "
                          "(e.g. --set foundation=EXPORT)")
    cfg = load_config(KaryotypeConfig, config, list(overrides or []))
    run = Path(out)
    if (run / "eval" / "metrics.json").is_file() and (run / "model" / "model.safetensors").is_file():
        saved = _flat(to_dict(load_config(KaryotypeConfig, run / "config.yaml")))
        changed = sorted(k for k, v in _flat(to_dict(cfg)).items() if saved.get(k) != v)
        if changed:
            raise HolonsError(f"{run} finished with another config ({', '.join(changed)})")
        print(f"{run.name}: finished with this config; reused", flush=True)
        return
    checkpoints = list((run / "checkpoints").glob("*.pt")) if run.is_dir() else []
    started = run.is_dir() and any(run.iterdir())
    try:
        train_karyotype(cfg, data_path(manifest), run, resume=bool(checkpoints),
                        overwrite=started and not checkpoints)
    except KaryotypeInterrupted as e:
        raise SystemExit(128 + e.signum) from e


def select_rows(manifest: str, out: str, column: str, value: str) -> None:
    """``out``: the rows of the CSV ``manifest`` whose ``column`` equals ``value``, ``path`` made absolute."""
    source = data_path(manifest)
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    if column not in table.columns or "path" not in table.columns:
        raise HolonsError(f"{source} has no {column!r} or 'path' column")
    rows = table[table[column] == value].copy()
    if rows.empty:
        raise HolonsError(f"{source}: no row has {column} = {value!r}")
    rows["path"] = [str((source.parent / p).resolve()) for p in rows["path"]]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(out), "w") as f:
        rows.to_csv(f, index=False)
