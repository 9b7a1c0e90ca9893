"""Hierarchical k-means and balanced hierarchical sampling, for data curation.

After Vo et al., "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach" (TMLR 2024), and its code (facebookresearch/ssl-data-curation):

* Level 1 clusters the data; level l+1 clusters the centroids of level l. Every level
  is ``ops.kmeans.fit``: the one loop, on the workers for level 1, in process above.
* Resampling refinement (the paper's section 4): after a level's k-means, draw
  ``per_cluster`` points from every cluster (random, or the closest to its centroid),
  refit k-means on that evenly spread sample, and repeat. Centroids then cover the data's
  support instead of crowding its dense regions.
* Balanced sampling, top down: a target of N points is split as evenly as possible over
  the top-level clusters (no cluster gives more than it holds; the cap is found by
  water-filling), each share likewise over its children, down to level 1, where points
  are drawn at random or closest to the centroid. Every point is drawn at most once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from ops.assign import CentroidIndex, squared_distances
from ops.dataset import ArrayData
from ops.kmeans import KMeansParams, fit, init_state

STRATEGIES = ("random", "closest")


class ClusterSampler(Protocol):
    def cluster_samples(
        self, centroids: np.ndarray, per_cluster: int, strategy: str, seed: int
    ) -> np.ndarray:
        """Up to ``per_cluster`` rows of every cluster of ``centroids``, stacked."""
        ...


def cluster_samples(
    labels: np.ndarray,
    d2: np.ndarray,
    k: int,
    per_cluster: int | np.ndarray,
    strategy: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Row indices: up to ``per_cluster`` (one count, or one per cluster) of each of the
    k clusters given by ``labels``, at random or with the smallest squared distances
    ``d2`` to their centroid."""
    order = np.lexsort((rng.random(len(labels)) if strategy == "random" else d2, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_labels]
    quota = np.broadcast_to(np.asarray(per_cluster), (k,))
    return order[rank < quota[sorted_labels]]


def nearest_cluster_samples(
    x: np.ndarray,
    centroids: np.ndarray,
    metric: str,
    per_cluster: int,
    strategy: str,
    rng: np.random.Generator,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, d2) of ``cluster_samples`` over x assigned to its nearest centroid;
    labels and squared distances are those of the chosen rows."""
    D, I = CentroidIndex(centroids, metric, device).search(x)
    labels, d2 = I[:, 0], squared_distances(D[:, 0], metric)
    rows = cluster_samples(labels, d2, len(centroids), per_cluster, strategy, rng)
    return rows, labels[rows], d2[rows]


def resample_refine(
    data: ClusterSampler,
    centroids: np.ndarray,
    params: KMeansParams,
    steps: int,
    per_cluster: int,
    strategy: str,
) -> np.ndarray:
    """``steps`` rounds of: sample ``per_cluster`` rows per cluster, refit k-means on them."""
    for step in range(steps):
        sample = data.cluster_samples(centroids, per_cluster, strategy, params.seed + step)
        if len(sample) < params.k:
            break  # fewer sampled rows than clusters: nothing left to refine
        local = ArrayData(sample, params.metric)
        stepped = replace(params, seed=params.seed + 1000 + step)
        centroids = fit(local, stepped, init_state(local, stepped)[0]).centroids
    return centroids


@dataclass
class Hierarchy:
    """centroids[l] (k_l, d) per level; parents[l] (k_l,) the level-(l+1) cluster of each
    level-l centroid (the last level has none)."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]

    def paths(self, level1: np.ndarray) -> np.ndarray:
        """(n, L) cluster at every level for rows whose level-1 clusters are ``level1``."""
        out = [np.asarray(level1)]
        for parent in self.parents:
            out.append(parent[out[-1]])
        return np.stack(out, axis=1)


def upper_levels(
    level1: np.ndarray,
    ks: list[int],
    params: KMeansParams,
    steps: int = 0,
    per_cluster: int | None = None,
    strategy: str = "closest",
) -> Hierarchy:
    """Levels 2.. over the level-1 centroids, in process, and the parent links.

    ``per_cluster`` points per cluster in each resampling round; None: half the mean
    cluster size of the level, as the paper's configurations do."""
    centroids, parents = [np.asarray(level1, np.float32)], []
    for level, k in enumerate(ks, start=2):
        below = centroids[-1]
        p = replace(params, k=k, seed=params.seed + level)
        data = ArrayData(below, params.metric)
        c = fit(data, p, init_state(data, p)[0]).centroids
        if steps:
            size = per_cluster or max(1, len(below) // (2 * k))
            c = resample_refine(InMemorySampler(data.x, data.metric), c, p, steps, size, strategy)
        _, I = CentroidIndex(c, data.metric).search(below)
        centroids.append(c)
        parents.append(I[:, 0])
    return Hierarchy(centroids, parents)


class InMemorySampler:
    """``cluster_samples`` over rows held in this process."""

    def __init__(self, x: np.ndarray, metric: str = "l2"):
        self.x, self.metric = x, metric

    def cluster_samples(self, centroids, per_cluster, strategy, seed):
        rng = np.random.default_rng(seed)
        rows, _, _ = nearest_cluster_samples(
            self.x, centroids, self.metric, per_cluster, strategy, rng
        )
        return np.asarray(self.x[rows], np.float32)


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Integer shares (one per cluster) summing to min(target, sum(sizes)), each at most
    its size, as equal as that allows: the largest cap c with sum(min(size, c)) <= target,
    then the remainder one apiece to randomly chosen clusters still above the cap."""
    sizes = np.asarray(sizes, np.int64)
    target = int(min(target, sizes.sum()))
    if target == 0:
        return np.zeros_like(sizes)
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # largest cap whose total does not exceed the target
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    shares = np.minimum(sizes, lo)
    room = np.flatnonzero(sizes > lo)
    extra = target - int(shares.sum())
    shares[rng.choice(room, extra, replace=False)] += 1
    return shares


def balanced_sample(
    paths: np.ndarray, d2: np.ndarray, target: int, strategy: str, seed: int
) -> np.ndarray:
    """Row indices of a balanced sample of ``target`` rows, each at most once.

    paths (n, L): each row's cluster at levels 1..L; d2 (n,): its squared distance to
    its level-1 centroid (for "closest").
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    rng = np.random.default_rng(seed)
    levels = paths.shape[1]
    # Shares top down: quota[level][cluster] = rows to draw under that cluster.
    top = paths[:, -1]
    quota = water_fill(np.bincount(top), target, rng)
    for level in range(levels - 2, -1, -1):
        child, parent = paths[:, level], paths[:, level + 1]
        k = child.max() + 1
        sizes = np.bincount(child, minlength=k)
        parent_of = np.zeros(k, np.int64)
        parent_of[child] = parent
        child_quota = np.zeros(k, np.int64)
        for p in np.flatnonzero(quota):
            members = np.flatnonzero((parent_of == p) & (sizes > 0))
            child_quota[members] = water_fill(sizes[members], quota[p], rng)
        quota = child_quota
    return np.sort(cluster_samples(paths[:, 0], d2, len(quota), quota, strategy, rng))
