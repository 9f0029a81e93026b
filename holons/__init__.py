"""holons: foundation weights for radiographs learned as a part-whole anatomy hierarchy.

The Python API (the ``holons`` command line is a thin layer over it; each subcommand calls one of
these)::

    from holons import index, cache, pretrain, export, finetune, predict, evaluate, karyotype

- ``index(archive, out_manifest, ...)``: headers of an image archive into a Parquet manifest;
- ``cache(manifest, out, size=...)``: decode every image once into shards;
- ``pretrain(config, out, overrides, resume=, overwrite=)``: self-supervised pretraining;
- ``export(run, out)``: the backbone as timm-loadable safetensors;
- ``finetune.classify / finetune.segment(config, data=, out=, overrides=, resume=, overwrite=)``;
- ``predict(model_folder, images, out=)``: CSV probabilities or masks in the source geometry;
- ``evaluate.correspondence / fewshot_segmentation / classification / cam / compare``;
- ``karyotype.train / predict / fit_dispatch / evaluate / karyogram``.

Names load on first use, so ``import holons`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "index": ("holons.data.index", "index_archive"),
    "cache": ("holons.data.cache", "build_cache"),
    "pretrain": ("holons.ssl.trainer", "pretrain"),
    "export": ("holons.ssl.export", "export"),
    "finetune": ("holons.finetune", None),
    "predict": ("holons.finetune.prediction", "predict"),
    "evaluate": ("holons.eval.api", None),
    "karyotype": ("holons.finetune.karyotype.api", None),
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        loaded = import_module(module)
        return loaded if attribute is None else getattr(loaded, attribute)
    raise AttributeError(f"module 'holons' has no attribute {name!r}")
