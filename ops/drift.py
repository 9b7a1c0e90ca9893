"""Drift between two runs: match the centroids, then compare the labels of shared ids.

Matching is the Hungarian method (``scipy.optimize.linear_sum_assignment``) on squared
distances between centroids, one-to-one; above HUNGARIAN_MAX_K, where its O(k^3) cost
stops being reasonable, each previous centroid goes to its nearest current one.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.ops.arrays import as_float32
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.scores import pairwise_sq_distances

HUNGARIAN_MAX_K = 2048


def match_centroids(previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, str]:
    """mapping (k_prev,): previous centroid j corresponds to current ``mapping[j]``."""
    previous, current = as_float32(previous), as_float32(current)
    if max(len(previous), len(current)) <= HUNGARIAN_MAX_K:
        from scipy.optimize import linear_sum_assignment  # 0.4 s to import: only here

        rows, cols = linear_sum_assignment(pairwise_sq_distances(previous, current))
        mapping = np.full(len(previous), -1, np.int64)
        mapping[rows] = cols
        return mapping, "hungarian"
    _, I = CentroidIndex(current).search(previous)
    return I[:, 0], "nearest"


def matched_shifts(previous: np.ndarray, current: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Distance each matched previous centroid moved (unmatched ones skipped)."""
    ok = mapping >= 0
    return np.linalg.norm(previous[ok] - current[mapping[ok]], axis=1)


def centroid_shift(previous: np.ndarray, current: np.ndarray, mapping: np.ndarray) -> dict:
    """Distances between matched centroids: mean, median, max (unmatched ones skipped)."""
    d = matched_shifts(previous, current, mapping)
    return {"mean": float(d.mean()), "median": float(np.median(d)), "max": float(d.max())}


def changed_fraction(
    previous_labels: np.ndarray,
    current_labels: np.ndarray,
    mapping: np.ndarray,
    counts: np.ndarray | None = None,
) -> float:
    """Share of rows whose label changed, after carrying previous labels through the
    matching (a row counts as changed when its previous cluster has no match). With
    ``counts``, entry i stands for counts[i] rows (a contingency table's pairs)."""
    weights = np.ones(len(previous_labels)) if counts is None else np.asarray(counts, float)
    if weights.sum() == 0:
        return 0.0
    carried = mapping[previous_labels]
    return float(weights[carried != current_labels].sum() / weights.sum())
