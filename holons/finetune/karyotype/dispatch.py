"""Per-case dispatch: turn each chromosome's type probabilities into a consistent karyotype.

Two rules, both on an ``n x 24`` table of probabilities (types 0..21 autosomes, 22 X, 23 Y):

- ``greedy`` (Varifocal-Net's rule): every chromosome takes its top type; a type keeps at most two
  (Y at most one; a third only when all three have p > 0.9); the least likely of the surplus move
  once to their second choice.
- ``optimal``: a linear sum assignment (``scipy.optimize.linear_sum_assignment``) of chromosomes to
  slots, two per autosome plus the sex slots of XX or of XY (whichever assignment is more likely),
  with cost ``-log p``. Chromosomes left over (more than 46) keep their top type, so a trisomy
  still shows; missing chromosomes leave slots empty.

The sex is inferred from the likelihoods of the XX and XY assignments (with its confidence), and
abnormal counts are named: trisomy / monosomy / missing per autosome, and the sex-chromosome
complement when X + Y != 2.

The learned methods (``LEARNED_METHODS``) take the refined probabilities of a trained per-cell
dispatcher (:mod:`~holons.finetune.karyotype.learned_dispatch`, computed over the whole cell from the
chromosomes' features): ``learned`` keeps their top type, ``learned_then_optimal`` runs the optimal
assignment on them; the sex is then inferred from the refined probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from holons.finetune.karyotype.data import CLASS_NAMES, NUM_TYPES

X, Y = 22, 23
_EPS = 1e-12
METHODS = ("none", "greedy", "optimal")
"""The rules that need only the classifier's probabilities."""
LEARNED_METHODS = ("learned", "learned_then_optimal")
"""The methods that need a trained per-cell dispatcher's refined probabilities."""
ALL_METHODS = METHODS + LEARNED_METHODS


@dataclass
class DispatchResult:
    """The dispatched types of one case and what follows from them."""

    labels: np.ndarray
    """Type 0..23 per chromosome after dispatch."""
    changed: list[dict] = field(default_factory=list)
    """``{"index", "from", "to"}`` (type names) for every chromosome dispatch moved."""
    counts: dict[str, int] = field(default_factory=dict)
    sex: str = ""
    sex_confidence: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"counts": self.counts, "sex": self.sex, "sex_confidence": round(self.sex_confidence, 4),
                "warnings": self.warnings, "changed": self.changed}


def _check(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != NUM_TYPES:
        raise ValueError(f"expected an n x {NUM_TYPES} probability table, got shape {p.shape}")
    return p


def greedy_dispatch(probs: np.ndarray, *, third_threshold: float = 0.9) -> np.ndarray:
    """The paper's greedy rule (see module doc); returns the type per chromosome."""
    p = _check(probs)
    order = np.argsort(-p, axis=1)
    labels = order[:, 0].copy()
    for t in range(NUM_TYPES):
        members = np.flatnonzero(order[:, 0] == t)
        cap = 1 if t == Y else 2
        if len(members) <= cap:
            continue
        members = members[np.argsort(-p[members, t], kind="stable")]
        if t != Y and len(members) == 3 and (p[members, t] > third_threshold).all():
            continue
        labels[members[cap:]] = order[members[cap:], 1]
    return labels


def _assign(logp: np.ndarray, sex_slots: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """Optimal assignment to 2 x 22 autosome slots plus ``sex_slots``; (labels, log-likelihood)."""
    slots = np.concatenate([np.repeat(np.arange(22), 2), np.asarray(sex_slots, dtype=int)])
    cost = -logp[:, slots]
    rows, cols = linear_sum_assignment(cost)
    labels = logp.argmax(1)
    labels[rows] = slots[cols]
    return labels, float(logp[np.arange(len(labels)), labels].sum())


def infer_sex(probs: np.ndarray) -> tuple[str, float, dict[str, np.ndarray]]:
    """``("XX" | "XY", confidence, {"XX": labels, "XY": labels})`` from the two optimal assignments.

    The confidence is the posterior of the chosen complement against the other (equal priors):
    ``1 / (1 + exp(L_other - L_chosen))`` with L the assignments' log-likelihoods.
    """
    logp = np.log(np.clip(_check(probs), _EPS, 1.0))
    xx, l_xx = _assign(logp, (X, X))
    xy, l_xy = _assign(logp, (X, Y))
    sex = "XY" if l_xy > l_xx else "XX"
    margin = abs(l_xy - l_xx)
    return sex, float(1.0 / (1.0 + np.exp(-margin))), {"XX": xx, "XY": xy}


def optimal_dispatch(probs: np.ndarray) -> np.ndarray:
    """The most likely assignment over 44 autosome slots and the XX or XY sex slots."""
    sex, _, labels = infer_sex(probs)
    return labels[sex]


def count_types(labels: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=int), minlength=NUM_TYPES)


def count_warnings(labels: np.ndarray) -> list[str]:
    """Plain-words warnings for abnormal counts: autosomes != 2 and X + Y != 2 (or Y > 1)."""
    counts = count_types(labels)
    out = []
    for t in range(22):
        c = int(counts[t])
        if c == 2:
            continue
        kind = "missing" if c == 0 else "monosomy" if c == 1 else "trisomy" if c == 3 else f"{c} copies"
        out.append(f"{kind} {CLASS_NAMES[t]} ({c} {'copy' if c == 1 else 'copies'})")
    nx, ny = int(counts[X]), int(counts[Y])
    if nx + ny != 2 or ny > 1:
        complement = "X" * nx + "Y" * ny or "none"
        out.append(f"sex chromosomes {complement} (X + Y = {nx + ny}, expected 2)")
    return out


def dispatch_case(probs: np.ndarray, method: str = "optimal", *,
                  refined: np.ndarray | None = None) -> DispatchResult:
    """Dispatch one case with ``method`` (one of ``ALL_METHODS``) and describe it.

    ``refined``: the learned dispatcher's refined probabilities of the same chromosomes (same rows),
    required by the learned methods and ignored by the others. What dispatch ``changed`` is always
    measured against the classifier's top type (``probs``).
    """
    if method not in ALL_METHODS:
        raise ValueError(f"dispatch method must be one of {ALL_METHODS}, got {method!r}")
    p = _check(probs)
    top = p.argmax(1)
    basis = p
    if method in LEARNED_METHODS:
        if refined is None:
            raise ValueError(f"dispatch method {method!r} needs a learned dispatcher's refined probabilities")
        basis = _check(refined)
        if basis.shape != p.shape:
            raise ValueError(f"refined probabilities {basis.shape} do not match the probabilities {p.shape}")
    if method == "greedy":
        labels = greedy_dispatch(p)
    elif method in ("optimal", "learned_then_optimal"):
        labels = optimal_dispatch(basis)
    else:
        labels = basis.argmax(1)
    sex, confidence, _ = infer_sex(basis) if len(p) else ("", 0.0, {})
    counts = count_types(labels)
    changed = [{"index": int(i), "from": CLASS_NAMES[top[i]], "to": CLASS_NAMES[labels[i]]}
               for i in np.flatnonzero(labels != top)]
    return DispatchResult(
        labels=labels, changed=changed, counts={CLASS_NAMES[t]: int(counts[t]) for t in range(NUM_TYPES)},
        sex=sex, sex_confidence=confidence, warnings=count_warnings(labels),
    )
