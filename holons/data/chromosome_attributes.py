"""Approximate class attributes of the 24 human chromosome types, for attribute-guided embeddings.

Per type (1..22, X, Y): the relative length (% of the total length of a haploid autosome set plus
X) and the centromeric index (short-arm length / total length, %). Source: the standard
measurements of the Paris Conference (1971) tables as reprinted in ISCN (1978, 1985) and in
cytogenetics textbooks (e.g. Gardner & Sutherland, *Chromosome Abnormalities and Genetic
Counseling*); rounded here, and individual measurements vary by several percent with condensation,
so these are semantic descriptors of each class (what SGMA's attribute embedding needs), not
reference values for measurement.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CHROMOSOME_TYPES", "ISCN_ATTRIBUTES", "chromosome_attribute_matrix"]

CHROMOSOME_TYPES = tuple([str(k) for k in range(1, 23)] + ["X", "Y"])

# type: (relative length %, centromeric index %)
ISCN_ATTRIBUTES: dict[str, tuple[float, float]] = {
    "1": (8.44, 48.4), "2": (8.02, 39.0), "3": (6.83, 46.9), "4": (6.30, 29.1), "5": (6.08, 29.3),
    "6": (5.90, 39.1), "7": (5.36, 39.0), "8": (4.93, 34.0), "9": (4.80, 35.0), "10": (4.59, 33.0),
    "11": (4.61, 40.0), "12": (4.66, 30.2), "13": (3.74, 17.0), "14": (3.56, 18.7), "15": (3.46, 19.6),
    "16": (3.36, 41.4), "17": (3.25, 33.9), "18": (2.93, 30.5), "19": (2.67, 46.6), "20": (2.56, 45.5),
    "21": (1.90, 31.0), "22": (2.04, 30.0), "X": (5.12, 40.1), "Y": (2.15, 27.0),
}


def chromosome_attribute_matrix() -> np.ndarray:
    """The table as a ``24 x 2`` float32 matrix in ``CHROMOSOME_TYPES`` order, each column standardized
    (zero mean, unit variance), ready to be used as class attribute vectors."""
    values = np.array([ISCN_ATTRIBUTES[t] for t in CHROMOSOME_TYPES], dtype=np.float64)
    return ((values - values.mean(axis=0)) / values.std(axis=0)).astype(np.float32)
