"""The karyotyping API: ``holons.karyotype.train / predict / fit_dispatch / evaluate / karyogram``.

One call per ``holons karyotype`` subcommand, with the shape every holons trainer has:
``train(config, *, data, out, overrides, resume, overwrite)`` takes a YAML path, a dict or a
``KaryotypeConfig`` (``None``: the built-in defaults) and returns a :class:`KaryotypeRun`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holons.finetune.karyotype.config import KaryotypeConfig


@dataclass
class KaryotypeRun:
    """What a training run left: the run folder, the model folder to deploy, the test metrics."""

    out: Path
    model: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class KaryotypePredictions:
    """What ``predict`` wrote: ``predictions.csv``, one JSON per case, and metrics for labelled data."""

    out: Path
    predictions: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any] | None:
        """Type / polarity / per-case accuracy when the manifest had labels, else None."""
        return self.summary.get("metrics")


def train(config: KaryotypeConfig | str | Path | dict | None = None, *, data: str | Path, out: str | Path,
          overrides: list[str] | dict | None = None, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> KaryotypeRun:
    """Train on the manifest ``data``, save the model to ``out/model``, evaluate on the test split.

    Raises ``KaryotypeInterrupted`` (state saved) on SIGTERM / SIGINT; ``resume=True`` continues.
    """
    from holons.config import resolve_config
    from holons.finetune.karyotype.train import train_karyotype

    cfg = resolve_config(KaryotypeConfig, config, overrides)
    metrics = train_karyotype(cfg, data, out, resume=resume, overwrite=overwrite, progress=progress)
    return KaryotypeRun(out=Path(out), model=Path(out) / "model", metrics=metrics)


def predict(model: str | Path, data: str | Path, out: str | Path, *, dispatch: str = "auto",
            batch_size: int = 256, device: str = "auto",
            progress: bool | None = None) -> KaryotypePredictions:
    """Predict types and polarity of a manifest or a folder of cases and dispatch each case."""
    from holons.finetune.karyotype.predict import predict_karyotypes

    summary = predict_karyotypes(model, data, out, dispatch=dispatch, batch_size=batch_size, device=device,
                                 progress=progress)
    return KaryotypePredictions(out=Path(out), predictions=Path(out) / "predictions.csv", summary=summary)


def fit_dispatch(run: str | Path, data: str | Path, *, steps: int = 600, seed: int = 0, device: str = "cpu",
                 progress: bool | None = None) -> dict[str, Any]:
    """Train a run's learned per-cell dispatcher and compare it with greedy / optimal (a report dict)."""
    from holons.finetune.karyotype.fit_dispatch import fit_learned_dispatch

    return fit_learned_dispatch(run, data, steps=steps, seed=seed, device=device, progress=progress)


def evaluate(run: str | Path, data: str | Path, *, heads: list[str] | None = None, vflip: bool = False,
             device: str = "auto") -> list[dict[str, Any]]:
    """Evaluate a trained run again on its test split: one row per head and test-time averaging
    (none, mirror, and with ``vflip`` mirror + upside down); also written to ``run/reeval/``."""
    from holons.finetune.karyotype.reeval import reevaluate

    return reevaluate(run, data, heads, vflip=vflip, device=device)


def karyogram(predictions: str | Path, case: str, out: str | Path) -> Path:
    """Draw one case of a ``predict`` folder as a karyogram PNG; returns the file."""
    from holons.finetune.karyotype.karyogram import karyogram_from_predictions

    karyogram_from_predictions(predictions, case, out)
    return Path(out)


__all__ = ["KaryotypePredictions", "KaryotypeRun", "evaluate", "fit_dispatch", "karyogram", "predict",
           "train"]
