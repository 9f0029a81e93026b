"""A trained karyotype model as a folder: ``model.safetensors`` + ``karyotype.json`` (config, the
recorded :class:`~holons.finetune.karyotype.preprocess.Preprocessing`, sizes, head), the device it
runs on, and a run's recorded splits rebuilt from ``split.csv``. What ``predict``, ``fit-dispatch``
and the benchmarks load."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from holons.config import to_dict
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.data import KaryotypeDataset, load_table
from holons.finetune.karyotype.model import VarifocalNet
from holons.finetune.karyotype.preprocess import Preprocessing
from holons.runs import provenance

MODEL_DIR = "model"
META_FILE = "karyotype.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: VarifocalNet, cfg: KaryotypeConfig, preprocessing: Preprocessing, head: str,
               folder: Path) -> None:
    """``model.safetensors`` + ``karyotype.json`` (config, preprocessing, sizes, head)."""
    from safetensors.torch import save_file

    from holons.files import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = {"format": "holons-karyotype/2", "config": to_dict(cfg), "preprocessing": preprocessing.to_json(),
            "canvas": preprocessing.canvas, "stain": preprocessing.stain, "input_size": cfg.data.input_size,
            "source_size": cfg.data.source_size,
            "head": head, "classes": [str(k) for k in range(1, 23)] + ["X", "Y"],
            **provenance()}
    with atomic_write(folder / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)


def model_folder(folder: str | Path) -> Path:
    """The model folder itself, or ``folder/model`` when ``folder`` is a run folder holding one."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file() and (folder / MODEL_DIR / META_FILE).is_file():
        return folder / MODEL_DIR
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[VarifocalNet, dict]:
    """Load a model folder written by :func:`save_model` (``folder`` may also be the run dir)."""
    from safetensors.torch import load_file

    from holons.config import load_config

    folder = model_folder(folder)
    if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise HolonsError(f"{folder} is not a karyotype model folder (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    cfg = load_config(KaryotypeConfig, None, meta["config"])
    cfg.model.g_pretrained_dir = cfg.model.l_pretrained_dir = None  # the weights come from the folder
    model = VarifocalNet(cfg.model, meta["input_size"])
    state = load_file(str(folder / WEIGHTS_FILE))
    for key in ("g_norm", "l_norm"):  # folders written before input normalization was recorded
        if key in model.state_dict():
            state.setdefault(key, torch.tensor([0.0, 1.0]))
    model.load_state_dict(state)
    if "preprocessing" not in meta:  # folders of format 1 recorded the canvas and the stain only
        meta["preprocessing"] = Preprocessing(stain=meta["stain"], canvas=meta["canvas"]).to_json()
    return model.to(device).eval(), meta


def run_datasets(run_dir: str | Path, manifest: str | Path, meta: dict, *,
                 names: tuple[str, ...] = ("train", "val", "test"),
                 progress: bool = False) -> dict[str, KaryotypeDataset]:
    """A run's recorded splits ``names`` (``split.csv`` rows, in its order, found in ``manifest`` by
    path), preprocessed as the model records: the chromosomes the run trained and was tested on."""
    split_file = Path(run_dir) / "split.csv"
    if not split_file.is_file():
        raise HolonsError(f"{run_dir} has no split.csv (pass the run folder of `holons karyotype train`)")
    split = pd.read_csv(split_file, dtype={"case_id": str, "path": str})
    split = split[split["split"].isin(names)]
    table, _ = load_table(manifest, default_polarity=int(meta["config"]["data"].get("default_polarity", 1)))
    table = table[table["label"] >= 0].drop_duplicates("path").set_index("path")
    missing = split.loc[~split["path"].isin(table.index), "path"]
    if len(missing):
        raise HolonsError(f"{manifest}: {len(missing)} of the run's {len(split)} chromosomes are not in it "
                          f"with a label (first: {missing.iloc[0]}); pass the run's own manifest")
    prep = Preprocessing.from_json(meta["preprocessing"])
    return {name: KaryotypeDataset(table.loc[split.loc[split["split"] == name, "path"]].reset_index(),
                                   preprocessing=prep, size=meta["source_size"], progress=progress)
            for name in names}
