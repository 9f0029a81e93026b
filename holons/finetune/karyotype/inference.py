"""Inference of a karyotype model over a dataset: the one path that validation, the test
evaluation, the learned dispatcher and ``karyotype predict`` all use, so they cannot disagree.

:func:`predict_dataset` gives type and polarity probabilities; :func:`predict_with_features` the
same probabilities (computed identically) plus their logarithms and the pooled features that the
learned per-cell dispatcher (:mod:`~holons.finetune.karyotype.learned_dispatch`) reads. Both run
the test-time views of :func:`_views` and average over them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from holons.finetune.karyotype.data import KaryotypeDataset
from holons.finetune.karyotype.model import VarifocalNet

LOG_PROB_FLOOR = 1e-12
"""Probabilities are clamped to at least this before the logarithm the dispatcher reads."""


class FeaturePrediction(NamedTuple):
    """Per chromosome: what :func:`predict_dataset` returns, plus the dispatcher's inputs."""

    types: torch.Tensor
    """N x 24 type probabilities, averaged over the test-time views."""
    polarity: torch.Tensor
    """N x 2 polarity probabilities, averaged over the views (upside-down views swapped back)."""
    log_probs: torch.Tensor
    """N x 24 ``log(max(types, LOG_PROB_FLOOR))``."""
    features: torch.Tensor
    """N x D pooled features (G-Net's, then the L-Net's when the model has one), averaged over the views."""


def _views(x: torch.Tensor, hflip: bool, vflip: bool) -> list[tuple[torch.Tensor, bool]]:
    """The test-time views of a batch: ``(images, upside_down)``; the image itself, its mirror
    image (``hflip``) and, with ``vflip``, each of those upside down.

    Flip policy: both test-time flips are off unless the model's config turns them on
    (``train.test_time_hflip`` / ``test_time_vflip``); the mirror is kept only where it measures
    better (some shipped configs turn it on, with the measurement in their comments)."""
    views = [(x, False)] + ([(x.flip(-1), False)] if hflip else [])
    if vflip:  # upside down: the same type, the opposite polarity
        views += [(v.flip(-2), True) for v, _ in views]
    return views


@torch.no_grad()
def _run(model: VarifocalNet, dataset: KaryotypeDataset, head: str, device: torch.device, batch_size: int,
         flip_mask: torch.Tensor | None, hflip: bool, vflip: bool,
         features: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Types, polarity and (``features``) pooled features averaged over the views, batch by batch."""
    model.eval()
    types, pols, feats = [], [], []
    for i in range(0, len(dataset), batch_size):
        x = dataset.images[i:i + batch_size].float().div_(255.0)
        if flip_mask is not None:
            m = flip_mask[i:i + batch_size]
            x = torch.where(m[:, None, None, None], x.flip(-2), x)
        views = _views(x.to(device), hflip, vflip)
        t = p = f = 0.0
        for view, upside_down in views:
            if features:
                tv, pv, fv = model.predict_features(view, head)
                f = f + fv
            else:
                tv, pv = model.predict_logits(view, head)
            t, p = t + tv.softmax(1), p + (pv.softmax(1).flip(1) if upside_down else pv.softmax(1))
        types.append((t / len(views)).cpu())
        pols.append((p / len(views)).cpu())
        if features:
            feats.append((f / len(views)).float().cpu())
    if not types:
        return torch.zeros(0, 24), torch.zeros(0, 2), (torch.zeros(0, 0) if features else None)
    return torch.cat(types), torch.cat(pols), (torch.cat(feats) if features else None)


def predict_dataset(model: VarifocalNet, dataset: KaryotypeDataset, head: str, device: torch.device,
                    batch_size: int = 256, flip_mask: torch.Tensor | None = None, *, hflip: bool = False,
                    vflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Type probabilities (N x 24) and polarity probabilities (N x 2); optional vertical flips of the
    inputs (``flip_mask``); ``hflip`` averages each prediction with that of the mirror image,
    ``vflip`` with that of the upside-down image (its polarity probabilities swapped back)."""
    types, pols, _ = _run(model, dataset, head, device, batch_size, flip_mask, hflip, vflip, False)
    return types, pols


def predict_with_features(model: VarifocalNet, dataset: KaryotypeDataset, head: str, device: torch.device,
                          batch_size: int = 256, *, hflip: bool = False,
                          vflip: bool = False) -> FeaturePrediction:
    """:func:`predict_dataset` (same views, same probabilities) plus the type log-probabilities and
    the view-averaged pooled features: the inputs of the learned per-cell dispatcher."""
    types, pols, feats = _run(model, dataset, head, device, batch_size, None, hflip, vflip, True)
    assert feats is not None
    return FeaturePrediction(types, pols, types.clamp_min(LOG_PROB_FLOOR).log(), feats)
