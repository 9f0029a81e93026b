"""Learned per-cell dispatch (after KaryoNet, IEEE TMI 2023): all chromosomes of a cell at once.

The rule-based dispatch (:mod:`holons.finetune.karyotype.dispatch`) sees only the classifier's
probabilities. :class:`CellDispatcher` also sees each chromosome's feature vector (e.g. the
classifier's pooled features) and the *other* chromosomes of the same cell, so cell-level context
(condensation stage, stain, which types are already taken) can correct the classifier:

1. Per chromosome, the standardised feature vector and the 24 log-probabilities are embedded and
   summed into one token; a small transformer encoder (pre-norm, no positional encoding, so the
   result does not depend on the order of the chromosomes) mixes the tokens of one cell. Cells of
   different sizes share a batch through a key padding mask.
2. Residual output: ``logits = log_probs + head(tokens)`` with ``head`` zero-initialised, so an
   untrained dispatcher returns the classifier's log-probabilities exactly and training learns a
   correction.
3. Consistency: a few Sinkhorn iterations (log space, temperature ``T``) balance ``exp(logits / T)``
   against the column capacities of a 46-slot karyotype (2 per autosome, 2 for X, 1 for Y). Columns
   are only scaled *down* to their capacity (the KL projection onto ``sum <= capacity``), which is
   the slack that keeps trisomies and 47-chromosome cells representable; every iteration ends with
   a row normalisation, so each chromosome keeps a distribution over the 24 types. With zero
   iterations the refined distribution is the softmax of the logits.

Training minimises the cross-entropy of the refined distribution on whole cells, with random
chromosome dropout (0-3 per cell) so abnormal counts are seen. Prediction takes the argmax of the
refined distribution, optionally followed by the optimal assignment of ``dispatch.py`` on it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from holons.files import atomic_path, atomic_write
from holons.finetune.karyotype.dispatch import optimal_dispatch

log = logging.getLogger(__name__)

NUM_TYPES = 24
WEIGHTS_FILE = "cell_dispatcher.safetensors"
META_FILE = "cell_dispatcher.json"
DEFAULT_CAPACITIES = (2.0,) * 22 + (2.0, 1.0)
"""Slots per type: two per autosome, X two (XX), Y one (XY); used as upper bounds."""
_MIN_LOGP = -50.0
Array = np.ndarray | Tensor


class CellDispatcher(nn.Module):
    """Transformer over one cell's chromosomes; residual type logits plus Sinkhorn refinement."""

    def __init__(self, feature_dim: int, *, width: int = 128, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1, sinkhorn_iters: int = 5, temperature: float = 1.0,
                 capacities: Sequence[float] = DEFAULT_CAPACITIES) -> None:
        super().__init__()
        if len(capacities) != NUM_TYPES:
            raise ValueError(f"capacities needs {NUM_TYPES} values, got {len(capacities)}")
        self.hparams = {"feature_dim": int(feature_dim), "width": width, "layers": layers, "heads": heads,
                        "dropout": dropout, "sinkhorn_iters": sinkhorn_iters, "temperature": temperature,
                        "capacities": [float(c) for c in capacities]}
        self.sinkhorn_iters, self.temperature = int(sinkhorn_iters), float(temperature)
        self.register_buffer("log_capacity", torch.tensor(capacities, dtype=torch.float32).log())
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.embed_features = nn.Linear(feature_dim, width)
        self.embed_probs = nn.Linear(2 * NUM_TYPES, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, NUM_TYPES)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.val_accuracy: float | None = None

    def forward(self, features: Tensor, log_probs: Tensor, valid: Tensor) -> Tensor:
        """``(B, L, D)``, ``(B, L, 24)``, ``(B, L)`` bool (True = real chromosome) -> type logits
        ``(B, L, 24)``, equal to the (normalised) input log-probabilities before training."""
        logp = log_probs.clamp(min=_MIN_LOGP).log_softmax(-1)
        x = (features - self.feature_mean) / self.feature_std
        probs = torch.cat([logp.exp(), logp.clamp(min=-10) / 10], -1)
        token = self.embed_features(x) + self.embed_probs(probs)
        h = self.encoder(token, src_key_padding_mask=~valid)
        return logp + self.head(self.norm(h))

    def refine(self, logits: Tensor, valid: Tensor) -> Tensor:
        """Sinkhorn-balanced log-distribution ``(B, L, 24)``: rows sum to 1, columns <= capacity."""
        z = (logits / self.temperature).log_softmax(-1)
        pad = ~valid[..., None]
        for _ in range(self.sinkhorn_iters):
            col = torch.logsumexp(z.masked_fill(pad, -math.inf), dim=1, keepdim=True)
            z = (z + (self.log_capacity - col).clamp(max=0.0)).log_softmax(-1)
        return z

    def refined_log_probs(self, features: Tensor, log_probs: Tensor, valid: Tensor) -> Tensor:
        """``refine(forward(...))``: the dispatcher's per-chromosome log-distribution."""
        return self.refine(self(features, log_probs, valid), valid)


# --------------------------------------------------------------------------- cells and batches
def _as_tensor(a: Array) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().float().cpu()
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def _cells(case_ids: Sequence[str]) -> list[np.ndarray]:
    """Row indices of each case, cases in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(case_ids):
        groups.setdefault(str(c), []).append(i)
    return [np.asarray(g, dtype=np.int64) for g in groups.values()]


def _batch(rows: list[np.ndarray], feats: Tensor, logp: Tensor, device: torch.device,
           labels: Tensor | None = None) -> tuple[Tensor, ...]:
    """Pad the cells ``rows`` into ``(features, log_probs, valid[, labels])`` with -100 padding labels."""
    b, length = len(rows), max(len(r) for r in rows)
    f = feats.new_zeros(b, length, feats.shape[1])
    p = logp.new_zeros(b, length, NUM_TYPES)
    valid = torch.zeros(b, length, dtype=torch.bool)
    y = torch.full((b, length), -100, dtype=torch.long)
    for k, r in enumerate(rows):
        idx = torch.from_numpy(r)
        f[k, :len(r)], p[k, :len(r)], valid[k, :len(r)] = feats[idx], logp[idx], True
        if labels is not None:
            y[k, :len(r)] = labels[idx]
    out = (f.to(device), p.to(device), valid.to(device))
    return out + (y.to(device),) if labels is not None else out


@torch.no_grad()
def refined_probabilities(model: CellDispatcher, features: Array, log_probs: Array, case_ids: Sequence[str],
                          *, cells_per_batch: int = 32) -> np.ndarray:
    """The dispatcher's refined type probabilities ``(N, 24)``, rows in the input order."""
    model.eval()
    device = next(model.parameters()).device
    feats, logp = _as_tensor(features), _as_tensor(log_probs)
    out = np.zeros((len(logp), NUM_TYPES), dtype=np.float64)
    cells = _cells(case_ids)
    for s in range(0, len(cells), cells_per_batch):
        rows = cells[s:s + cells_per_batch]
        f, p, valid = _batch(rows, feats, logp, device)
        q = model.refined_log_probs(f, p, valid).exp().double().cpu().numpy()
        for k, r in enumerate(rows):
            out[r] = q[k, :len(r)]
    return out


def learned_dispatch(model: CellDispatcher, features: Array, log_probs: Array, case_ids: Sequence[str],
                     *, then: str = "none") -> np.ndarray:
    """Type 0..23 per chromosome: argmax of the refined distribution (``then="none"``) or the
    optimal 46-slot assignment of ``dispatch.py`` on it, per cell (``then="optimal"``)."""
    if then not in ("none", "optimal"):
        raise ValueError(f"then must be 'none' or 'optimal', got {then!r}")
    probs = refined_probabilities(model, features, log_probs, case_ids)
    labels = probs.argmax(1)
    if then == "optimal":
        for r in _cells(case_ids):
            labels[r] = optimal_dispatch(probs[r])
    return labels


# --------------------------------------------------------------------------- training
def _accuracy(model: CellDispatcher, data: tuple) -> float:
    feats, logp, labels, case_ids = data
    pred = learned_dispatch(model, feats, logp, case_ids)
    return float((pred == np.asarray(labels)).mean())


def train_cell_dispatcher(features: Array, log_probs: Array, labels: Array, case_ids: Sequence[str], *,
                          val: tuple | None = None, steps: int = 600, cells_per_batch: int = 8,
                          lr: float = 1e-3, weight_decay: float = 0.01, max_drop: int = 3, seed: int = 0,
                          device: str | torch.device = "cpu", **model_kwargs) -> CellDispatcher:
    """Train a :class:`CellDispatcher` on whole cells; returns it in eval mode.

    ``features (N, D)``, ``log_probs (N, 24)``, ``labels (N,)`` and ``case_ids`` (N strings) describe the
    training chromosomes; ``val`` is the same 4-tuple for validation (its accuracy is logged and kept as
    ``model.val_accuracy``). AdamW for a fixed number of ``steps`` with warm-up and cosine decay; each
    batch is ``cells_per_batch`` cells with 0..``max_drop`` chromosomes dropped and the order shuffled.
    Deterministic given ``seed`` on CPU (the global torch RNG is left as it was).
    """
    device = torch.device(device)
    feats, logp = _as_tensor(features), _as_tensor(log_probs)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if not (len(feats) == len(logp) == len(y) == len(case_ids)):
        raise ValueError("features, log_probs, labels and case_ids need the same length")
    cells = _cells(case_ids)
    rng = np.random.default_rng(seed)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = CellDispatcher(feats.shape[1], **model_kwargs)
        model.feature_mean.copy_(feats.mean(0))
        if len(feats) > 1:
            model.feature_std.copy_(feats.std(0).clamp(min=1e-6))
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        for _ in range(steps):
            chosen = rng.choice(len(cells), cells_per_batch, replace=len(cells) < cells_per_batch)
            rows = []
            for c in chosen:
                r = cells[c][rng.permutation(len(cells[c]))]
                drop = int(rng.integers(0, max_drop + 1)) if len(r) > 1 else 0
                rows.append(r[:len(r) - min(drop, len(r) - 1)])
            f, p, valid, target = _batch(rows, feats, logp, device, y)
            q = model.refined_log_probs(f, p, valid)
            loss = F.nll_loss(q.reshape(-1, NUM_TYPES), target.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    if val is not None:
        model.val_accuracy = _accuracy(model, val)
        base = float((np.asarray(_as_tensor(val[1]).argmax(1)) == np.asarray(val[2])).mean())
        log.info("cell dispatcher: val accuracy %.4f (classifier argmax %.4f)", model.val_accuracy, base)
    return model


# --------------------------------------------------------------------------- folder
def save_cell_dispatcher(model: CellDispatcher, folder: str | Path) -> None:
    """``cell_dispatcher.safetensors`` (weights and buffers) + ``cell_dispatcher.json`` (hyper-parameters)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = {"format": "holons-cell-dispatcher/1", "hparams": model.hparams,
            "val_accuracy": model.val_accuracy}
    with atomic_write(folder / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)


def has_cell_dispatcher(folder: str | Path) -> bool:
    """Whether ``folder`` holds the two files :func:`save_cell_dispatcher` writes."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() and (folder / META_FILE).is_file()


def load_cell_dispatcher(folder: str | Path, device: str | torch.device = "cpu") -> CellDispatcher:
    """Load a folder written by :func:`save_cell_dispatcher`; the model is in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    hp = dict(meta["hparams"])
    model = CellDispatcher(hp.pop("feature_dim"), **hp)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.val_accuracy = meta.get("val_accuracy")
    return model.to(device).eval()
