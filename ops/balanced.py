"""Balanced labels, row by row: argmax_j S_ij + beta_j, exactly, from one top-m search.

With D_ij the search distance (squared L2, or for "ip" the negated inner product), the
balanced score is beta_j - D_ij up to a per-row constant. The m nearest centroids are
the candidates; any other j has D_ij >= D_i(m), the m-th smallest distance, so its
score is at most max(beta) - D_i(m). A row whose best candidate (its M-th best, for
top-M) beats that bound is exact; the others, few when beta is narrow against the
distance gaps, are scored against all k centroids. m doubles while many rows fall back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ops.assign import CentroidIndex, squared_distances

FALLBACK_LIMIT = 0.05  # above this fraction of rows falling back, search more candidates


@dataclass
class Assignment:
    """Per-row results. ``topk_*`` are ranked by the balanced score when balancing."""

    label: np.ndarray  # (n,) balanced label, or the nearest without beta
    distance: np.ndarray  # (n,) squared distance to ``label``'s centroid
    nearest: np.ndarray  # (n,) nearest centroid
    nearest_distance: np.ndarray
    topk_labels: np.ndarray | None = None  # (n, M)
    topk_distances: np.ndarray | None = None
    topk_probs: np.ndarray | None = None  # softmax of the balanced scores / eps over M
    fallback_rows: int = 0


class BalancedAssigner:
    """Nearest and balanced labels for centroids (k, d) and column potentials beta (k,),
    in score units (``SinkhornResult.beta``), with the plan's eps for soft top-M."""

    def __init__(
        self,
        centroids: np.ndarray,
        metric: str,
        beta: np.ndarray | None = None,
        epsilon: float | None = None,
        device: str = "cpu",
        candidates: int = 32,
    ):
        self.index = CentroidIndex(centroids, metric, device)
        self.metric = metric
        self.k = len(centroids)
        self.beta = None if beta is None else np.asarray(beta, np.float32)
        self.epsilon = epsilon
        self.m = min(self.k, candidates)

    def _search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(distance-like D ascending, I): squared L2, or -x.c for "ip"."""
        D, I = self.index.search(x, m)
        return (D, I) if self.metric == "l2" else (-D, I)

    def assign(self, x: np.ndarray, topk: int = 0) -> Assignment:
        keep = max(topk, 1)
        if self.beta is None:
            D, I = self._search(x, keep)
            dist = squared_distances(D if self.metric == "l2" else -D, self.metric)
            out = Assignment(I[:, 0], dist[:, 0], I[:, 0], dist[:, 0])
            if topk:
                out.topk_labels, out.topk_distances = I, dist
            return out
        m = max(self.m, keep)
        D, I = self._search(x, m)
        score = self.beta[I] - D
        order = np.argsort(-score, axis=1, kind="stable")[:, :keep]
        best = np.take_along_axis(score, order, axis=1)
        bound = self.beta.max() - D[:, -1]
        exact = (best[:, -1] >= bound) | (m == self.k)
        fallback = np.flatnonzero(~exact)
        labels = np.take_along_axis(I, order, axis=1)
        dists = np.take_along_axis(D, order, axis=1)
        if len(fallback):
            Df, If = self._search(x[fallback], self.k)
            sf = self.beta[If] - Df
            of = np.argsort(-sf, axis=1, kind="stable")[:, :keep]
            labels[fallback] = np.take_along_axis(If, of, axis=1)
            dists[fallback] = np.take_along_axis(Df, of, axis=1)
            best[fallback] = np.take_along_axis(sf, of, axis=1)
            if len(fallback) > FALLBACK_LIMIT * len(x):
                self.m = min(self.k, 2 * self.m)
        to_sq = (lambda a: a) if self.metric == "l2" else (lambda a: -a)
        dist = squared_distances(to_sq(dists), self.metric)
        near_dist = squared_distances(to_sq(D[:, :1]), self.metric)[:, 0]
        out = Assignment(labels[:, 0], dist[:, 0], I[:, 0], near_dist, fallback_rows=len(fallback))
        if topk:
            out.topk_labels, out.topk_distances = labels, dist
            if self.epsilon:
                z = (best - best[:, :1]) / self.epsilon
                p = np.exp(z)
                out.topk_probs = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
        return out
