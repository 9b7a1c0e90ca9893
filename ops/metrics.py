"""Clustering quality from counts alone: a contingency table or cluster sizes.

Everything here takes counts, so a distributed pass can reduce rows to a (k, C) table
and score it on the driver. Formulas follow scikit-learn's ``metrics.cluster``:
NMI with the arithmetic mean of the entropies, ARI of Hubert & Arabie (1985).
"""

from __future__ import annotations

import numpy as np


def contingency(
    labels: np.ndarray, truth: np.ndarray, counts: np.ndarray | None = None
) -> np.ndarray:
    """(n_labels, n_classes) counts of (label, class) pairs; classes in sorted order.
    ``counts``: how often each pair occurs (pairs already counted elsewhere), else once."""
    _, l_idx = np.unique(labels, return_inverse=True)
    _, t_idx = np.unique(truth, return_inverse=True)
    table = np.zeros((l_idx.max() + 1, t_idx.max() + 1), np.int64)
    np.add.at(table, (l_idx, t_idx), 1 if counts is None else counts)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information, I(L;T) / mean(H(L), H(T))."""
    n = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    nz = table > 0
    outer = np.outer(rows, cols)[nz]
    mi = float((table[nz] / n * np.log(table[nz] * n / outer)).sum())
    h = (_entropy(rows) + _entropy(cols)) / 2
    return 1.0 if h == 0 else max(mi, 0.0) / h


def _pairs(n: np.ndarray | int) -> np.ndarray:
    """n choose 2, in float64 (scipy's ``comb(n, 2)``)."""
    n = np.asarray(n, np.float64)
    return n * (n - 1) / 2


def ari(table: np.ndarray) -> float:
    """Adjusted Rand index from pair counts."""
    n = table.sum()
    sum_cells = _pairs(table).sum()
    sum_rows, sum_cols = _pairs(table.sum(1)).sum(), _pairs(table.sum(0)).sum()
    expected = sum_rows * sum_cols / _pairs(n)
    top = (sum_rows + sum_cols) / 2
    return 1.0 if top == expected else float((sum_cells - expected) / (top - expected))


def matched_accuracy(table: np.ndarray) -> float:
    """Accuracy after the best one-to-one matching of labels to classes (Hungarian)."""
    from scipy.optimize import linear_sum_assignment  # ~0.4 s to import: only when scored

    r, c = linear_sum_assignment(table, maximize=True)
    return float(table[r, c].sum() / table.sum())


def size_stats(sizes: np.ndarray) -> dict[str, float]:
    """Balance of cluster sizes (k,): min, max, max/min, CV, entropy, imbalance factor.

    The imbalance factor is faiss's: k * sum(n_j^2) / n^2, 1 when perfectly balanced.
    Entropy is normalised by log k, so 1 means perfectly balanced.
    """
    sizes = np.asarray(sizes, np.float64)
    k, n = len(sizes), sizes.sum()
    return {
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "max_over_min": float(sizes.max() / sizes.min()) if sizes.min() > 0 else float("inf"),
        "cv": float(sizes.std() / sizes.mean()),
        "entropy": _entropy(sizes) / np.log(k) if k > 1 else 1.0,
        "imbalance_factor": float(k * (sizes**2).sum() / n**2),
        "empty": int((sizes == 0).sum()),
    }


def scores(table: np.ndarray) -> dict[str, float]:
    return {"nmi": nmi(table), "ari": ari(table), "accuracy": matched_accuracy(table)}
