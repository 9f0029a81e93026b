"""Export a pretraining run's backbone as timm-loadable foundation weights.

``export(run_dir, out_dir)`` writes ``model.safetensors`` (timm's own state-dict keys) and a
``config.json`` in timm's hub format, so that::

    timm.create_model("local-dir:DIR", pretrained=True)

rebuilds the backbone with ``in_chans=1``, no classifier, and our normalization (mean / std)
and training input size recorded in its ``pretrained_cfg``. Only plain tensors are written
(no pickles); run provenance goes in a separate top-level ``holons`` key and the radiograph
preprocessing contract (``holons.data.preprocess.Preprocessing``) in ``preprocessing``, both
ignored by timm; ``foundation_preprocessing`` reads the latter back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file
from torch import nn

from holons.data.preprocess import Preprocessing
from holons.errors import HolonsError
from holons.files import atomic_path, atomic_write, read_model_config
from holons.runs import load_checkpoint, resolve_checkpoint

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Training-only regularizers that must not become defaults of a downstream model.
_TRAINING_ONLY_ARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate")


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def timm_config(architecture: str, num_features: int, *, in_chans: int, input_size: int,
                mean: float, std: float, model_args: dict[str, Any] | None = None,
                provenance: dict[str, Any] | None = None,
                preprocessing: Preprocessing | None = None) -> dict[str, Any]:
    """The ``config.json`` content timm's ``local-dir:`` loader reads (timm >= 1.0 hub format)."""
    import timm

    reference = timm.create_model(architecture, pretrained=False, num_classes=0, in_chans=in_chans,
                                  **(model_args or {}))
    ref_cfg = dict(getattr(reference, "pretrained_cfg", {}) or {})
    global_pool = getattr(reference, "global_pool", None)
    if not isinstance(global_pool, str):
        global_pool = getattr(global_pool, "pool_type", None)
    pretrained_cfg = {
        "architecture": architecture,
        "input_size": [in_chans, input_size, input_size],
        "fixed_input_size": bool(ref_cfg.get("fixed_input_size", False)),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [float(mean)] * in_chans,
        "std": [float(std)] * in_chans,
        "num_classes": 0,
        "first_conv": ref_cfg.get("first_conv"),
        "classifier": ref_cfg.get("classifier"),
        "description": "holons foundation weights for radiographs (self-supervised part-whole pretraining)",
    }
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(num_features),
        "model_args": {"in_chans": in_chans, **_json_safe(model_args or {})},
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
    }
    if isinstance(global_pool, str) and global_pool:
        cfg["global_pool"] = global_pool
    if provenance:
        cfg["holons"] = provenance
    if preprocessing is not None:
        cfg["preprocessing"] = preprocessing.to_dict()
    return cfg


def save_foundation(model: nn.Module, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_write(out / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2)
    return out


def export(run_dir: str | Path, out_dir: str | Path | None = None,
           which: Literal["teacher", "student"] = "teacher", checkpoint: str | Path | None = None) -> Path:
    """Export the teacher (default) or student backbone of a run's newest checkpoint.

    ``out_dir`` defaults to ``RUN/exported``; ``checkpoint`` picks a specific checkpoint file.
    Returns the folder written.
    """
    from holons.ssl.backbone import create_backbone

    if which not in ("teacher", "student"):
        raise HolonsError(f"which must be 'teacher' or 'student', got {which!r}")
    run = Path(run_dir)
    ckpt_path = resolve_checkpoint(checkpoint if checkpoint is not None else run)
    state = load_checkpoint(ckpt_path)
    cfg = state["config"]
    model_cfg, data_cfg, views_cfg = cfg["model"], cfg["data"], cfg.get("views", {})
    name = model_cfg["backbone"]
    model_args = {k: v for k, v in dict(model_cfg.get("backbone_kwargs") or {}).items()
                  if k not in _TRAINING_ONLY_ARGS}
    backbone = create_backbone(name, in_chans=1, **model_args)
    try:
        backbone.model.load_state_dict(state[which]["backbone"])
    except (KeyError, RuntimeError) as e:
        raise HolonsError(f"{ckpt_path}: no usable {which} backbone ({e})") from e
    input_size = int(views_cfg.get("global_size") or data_cfg.get("image_size") or 224)
    provenance = {
        "which": which, "step": int(state["step"]), "method": cfg.get("method"),
        "checkpoint": ckpt_path.name, "versions": state.get("versions", {}),
        "git_commit": state.get("git_commit"),
    }
    config = timm_config(name, backbone.embed_dim, in_chans=1, input_size=input_size,
                         mean=float(data_cfg["mean"]), std=float(data_cfg["std"]),
                         model_args=model_args, provenance=provenance,
                         preprocessing=Preprocessing(size=input_size, resize="letterbox",
                                                     voi=_pretraining_voi(data_cfg)))
    return save_foundation(backbone.model, out_dir if out_dir is not None else run / "exported", config)


def _pretraining_voi(data_cfg: dict[str, Any]) -> str:
    """The VOI policy the pretraining images were read with: the cache's, else the reader's default."""
    settings = Path(str(data_cfg.get("cache_dir") or "")) / "cache.json"
    if data_cfg.get("cache_dir") and settings.is_file():
        return str(json.loads(settings.read_text()).get("voi", "window"))
    return "window"


def foundation_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing an exported folder was trained with (``config.json``); a timm folder from
    elsewhere, without that key, gets the default contract at its recorded input size."""
    cfg = json.loads((Path(path) / CONFIG_NAME).read_text())
    if "preprocessing" in cfg:
        return Preprocessing.from_dict(cfg["preprocessing"])
    input_size = cfg.get("pretrained_cfg", {}).get("input_size", [1, 224, 224])
    return Preprocessing(size=int(input_size[-1]))


def load_foundation(path: str | Path, **kwargs) -> nn.Module:
    """Load an exported folder as a ``holons.ssl.backbone.Backbone`` (pooled, dense and pyramid features).

    ``kwargs`` go to ``timm.create_model`` (e.g. ``drop_path_rate`` for fine-tuning).
    """
    from holons.ssl.backbone import create_backbone

    folder = Path(path)
    cfg = read_model_config(folder, weights=WEIGHTS_NAME, config=CONFIG_NAME,
                            what="an exported foundation folder")
    in_chans = int(cfg.get("model_args", {}).get("in_chans", 1))
    return create_backbone(cfg["architecture"], in_chans=in_chans, pretrained_dir=folder, **kwargs)


def foundation_stats(path: str | Path) -> dict[str, Any]:
    """Mean, std and input size recorded in an exported folder's ``config.json``."""
    cfg = json.loads((Path(path) / CONFIG_NAME).read_text())["pretrained_cfg"]
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "input_size": tuple(cfg["input_size"])}


__all__ = ["export", "load_foundation", "foundation_preprocessing", "foundation_stats", "save_foundation",
           "timm_config"]
