"""Learned per-cell dispatch: identity at init, learning cell context, padding, save/load, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from holons.finetune.karyotype.dispatch import optimal_dispatch
from holons.finetune.karyotype.learned_dispatch import (
    CellDispatcher,
    _batch,
    _cells,
    learned_dispatch,
    load_cell_dispatcher,
    refined_probabilities,
    save_cell_dispatcher,
    train_cell_dispatcher,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cells(n_cells: int, seed: int, noise_dims: int = 8) -> tuple:
    """Synthetic cells of 46 chromosomes (XX or XY), as ``(features, log_probs, labels, case_ids)``.

    In half of the cells ("condensed") the classifier reads every autosome one type up, cyclically over
    1..22, with the true type as a close second; elsewhere the true type wins with the next type second.
    Both readings fill every autosome slot exactly twice, so the probabilities alone cannot tell them
    apart: per-chromosome argmax and the optimal assignment are right on about half the cells. The
    features carry a weak per-chromosome condensation cue (+-1 under noise 2) and a weak one-hot of the
    true type; only pooled over the cell do they decide the reading.
    """
    rng = np.random.default_rng(seed)
    feats, logps, labels, cases = [], [], [], []
    for c in range(n_cells):
        t = np.concatenate([np.repeat(np.arange(22), 2), [22, 22] if rng.random() < 0.5 else [22, 23]])
        up = np.where(t < 22, (t + 1) % 22, t)
        shifted = rng.random() < 0.5
        pred, second = (up, t) if shifted else (t, up)
        z = rng.normal(0, 0.7, (46, 24))
        z[np.arange(46), pred] += 4.0
        z[np.arange(46), second] += np.where(t < 22, 3.2, 0.0)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        f = np.concatenate([(1.0 if shifted else -1.0) + rng.normal(0, 2.0, (46, 1)),
                            np.eye(24)[t] * 0.6 + rng.normal(0, 1.0, (46, 24)),
                            rng.normal(0, 1.0, (46, noise_dims))], 1)
        perm = rng.permutation(46)
        feats.append(f[perm])
        logps.append(logp[perm])
        labels.append(t[perm])
        cases += [f"s{seed}c{c}"] * 46
    return (np.concatenate(feats).astype(np.float32), np.concatenate(logps).astype(np.float32),
            np.concatenate(labels), cases)


def _perturbed(feature_dim: int, seed: int = 0) -> CellDispatcher:
    """An untrained dispatcher with a non-zero head, so its output depends on the whole cell."""
    torch.manual_seed(seed)
    model = CellDispatcher(feature_dim, width=32, heads=4)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def test_identity_at_init():
    f, lp, _, cases = make_cells(3, seed=5)
    torch.manual_seed(0)
    model = CellDispatcher(f.shape[1]).eval()
    rows = _cells(cases)
    x, p, valid = _batch(rows, torch.from_numpy(f), torch.from_numpy(lp), torch.device("cpu"))
    with torch.no_grad():
        logits = model(x, p, valid)
    assert torch.allclose(logits, p, atol=1e-5)
    model.sinkhorn_iters = 0  # no balancing: the refined distribution is the classifier's
    assert (learned_dispatch(model, f, lp, cases) == lp.argmax(1)).all()
    np.testing.assert_allclose(refined_probabilities(model, f, lp, cases), np.exp(lp), atol=1e-5)


def test_sinkhorn_respects_capacities():
    f, lp, _, cases = make_cells(2, seed=6)
    lp = lp.copy()
    lp[:10] = np.log(np.full(24, 0.01) + 0.76 * np.eye(24)[0])  # ten chromosomes all voting for type 1
    model = CellDispatcher(f.shape[1], sinkhorn_iters=20).eval()
    q = refined_probabilities(model, f, lp, cases)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)
    for r in _cells(cases):
        assert q[r, 0].sum() < 2.5  # pushed down towards the capacity of 2 (slack aside)


def test_learns_cell_context():
    train = make_cells(48, seed=0)
    f, lp, y, cases = test = make_cells(24, seed=1)
    argmax_acc = float((lp.argmax(1) == y).mean())
    opt = np.zeros_like(y)
    for r in _cells(cases):
        opt[r] = optimal_dispatch(np.exp(lp[r]))
    optimal_acc = float((opt == y).mean())
    model = train_cell_dispatcher(*train, val=test, steps=250, seed=0)
    learned = float((learned_dispatch(model, f, lp, cases) == y).mean())
    then_opt = float((learned_dispatch(model, f, lp, cases, then="optimal") == y).mean())
    assert optimal_acc < 0.7 and argmax_acc < 0.7
    assert learned > max(argmax_acc, optimal_acc) + 0.2, (learned, argmax_acc, optimal_acc)
    assert then_opt >= optimal_acc + 0.2
    assert model.val_accuracy == pytest.approx(learned)
    assert not model.training


def test_padding_does_not_change_outputs():
    f, lp, _, cases = make_cells(2, seed=2)
    cells = _cells(cases)
    short, long = cells[0][:45], np.concatenate([cells[1], cells[0][:1]])  # 45 and 47 chromosomes
    model = _perturbed(f.shape[1])
    ft, pt = torch.from_numpy(f), torch.from_numpy(lp)
    cpu = torch.device("cpu")
    with torch.no_grad():
        both = model.refined_log_probs(*_batch([short, long], ft, pt, cpu))
        alone = [model.refined_log_probs(*_batch([r], ft, pt, cpu))[0] for r in (short, long)]
        logits_both = model(*_batch([short, long], ft, pt, cpu))
        logits_alone = model(*_batch([short], ft, pt, cpu))[0]
    assert torch.allclose(both[0, :45], alone[0], atol=1e-5)
    assert torch.allclose(both[1], alone[1], atol=1e-5)
    assert torch.allclose(logits_both[0, :45], logits_alone, atol=1e-5)
    assert not torch.allclose(logits_both[0, :45], pt[torch.from_numpy(short)], atol=1e-2)  # not trivial


def test_save_load_round_trip(tmp_path):
    f, lp, y, cases = make_cells(4, seed=3)
    model = train_cell_dispatcher(f, lp, y, cases, steps=5, seed=1, width=32, sinkhorn_iters=3,
                                  temperature=0.8)
    save_cell_dispatcher(model, tmp_path)
    loaded = load_cell_dispatcher(tmp_path)
    assert loaded.hparams == model.hparams and loaded.temperature == 0.8 and loaded.sinkhorn_iters == 3
    assert torch.equal(loaded.feature_mean, model.feature_mean)
    np.testing.assert_array_equal(refined_probabilities(loaded, f, lp, cases),
                                  refined_probabilities(model, f, lp, cases))


def test_deterministic_by_seed():
    f, lp, y, cases = make_cells(6, seed=4)
    state = torch.get_rng_state()
    a = train_cell_dispatcher(f, lp, y, cases, steps=15, seed=7, width=32, cells_per_batch=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    b = train_cell_dispatcher(f, lp, y, cases, steps=15, seed=7, width=32, cells_per_batch=3)
    c = train_cell_dispatcher(f, lp, y, cases, steps=15, seed=8, width=32, cells_per_batch=3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
