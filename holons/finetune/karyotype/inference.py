"""Inference of a karyotype model over a dataset: the one path that validation, the test
evaluation and ``karyotype predict`` all use, so the three cannot disagree."""

from __future__ import annotations

import torch

from holons.finetune.karyotype.data import KaryotypeDataset
from holons.finetune.karyotype.model import VarifocalNet


@torch.no_grad()
def predict_dataset(model: VarifocalNet, dataset: KaryotypeDataset, head: str, device: torch.device,
                    batch_size: int = 256, flip_mask: torch.Tensor | None = None, *, hflip: bool = False,
                    vflip: bool = False):
    """Type probabilities (N x 24) and polarity probabilities (N x 2); optional vertical flips of the
    inputs (``flip_mask``); ``hflip`` averages each prediction with that of the mirror image,
    ``vflip`` with that of the upside-down image (its polarity probabilities swapped back)."""
    model.eval()
    types, pols = [], []
    for i in range(0, len(dataset), batch_size):
        x = dataset.images[i:i + batch_size].float().div_(255.0)
        if flip_mask is not None:
            m = flip_mask[i:i + batch_size]
            x = torch.where(m[:, None, None, None], x.flip(-2), x)
        x = x.to(device)
        views = [(x, False)] + ([(x.flip(-1), False)] if hflip else [])
        if vflip:  # upside down: the same type, the opposite polarity
            views += [(v.flip(-2), True) for v, _ in views]
        t = p = 0.0
        for view, upside_down in views:
            tv, pv = model.predict_logits(view, head)
            t, p = t + tv.softmax(1), p + (pv.softmax(1).flip(1) if upside_down else pv.softmax(1))
        types.append((t / len(views)).cpu())
        pols.append((p / len(views)).cpu())
    if not types:
        return torch.zeros(0, 24), torch.zeros(0, 2)
    return torch.cat(types), torch.cat(pols)
