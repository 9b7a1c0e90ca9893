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

import numpy as np

from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.dataset import STRATEGIES, ArrayData, ResamplableData
from pseudolabel.ops.init import KMEANSPP_POINTS_PER_CENTROID
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.ops.sampling import cluster_samples


def resample_refine(
    data: ResamplableData,
    centroids: np.ndarray,
    params: KMeansParams,
    steps: int,
    per_cluster: int,
    strategy: str,
) -> np.ndarray:
    """``steps`` rounds of: take ``per_cluster`` rows per cluster, refit k-means on them
    (seeded afresh, as the paper's code does). The rows stay where they are: the refit
    runs the same loop over ``data.cluster_subset``, a view of the chosen rows, and its
    seeding draws at most KMEANSPP_POINTS_PER_CENTROID * k of them, so what reaches the
    caller is O(k d) whatever the data's size."""
    for step in range(steps):
        subset = data.cluster_subset(centroids, per_cluster, strategy, params.seed + step)
        if subset.count() < params.k:
            break  # fewer sampled rows than clusters: nothing left to refine
        stepped = replace(params, seed=params.seed + 1000 + step)
        seeds = init_state(subset, stepped, max_sample=KMEANSPP_POINTS_PER_CENTROID * params.k)
        centroids = fit(subset, stepped, seeds[0]).centroids
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
            c = resample_refine(data, c, p, steps, size, strategy)
        _, I = CentroidIndex(c, data.metric).search(below)
        centroids.append(c)
        parents.append(I[:, 0])
    return Hierarchy(centroids, parents)


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


def sample_quotas(
    cluster_paths: np.ndarray, sizes: np.ndarray, target: int, rng: np.random.Generator
) -> np.ndarray:
    """Rows to draw from each level-1 cluster for a balanced sample of ``target`` rows.

    cluster_paths (k1, L): level-1 cluster i's cluster at levels 1..L (column 0 is i);
    sizes (k1,): its rows. Shares go top down: the top level's clusters share ``target``
    by water filling, each cluster's share is split the same way among its children
    that hold rows, down to level 1. Needs only k1 numbers, not the rows.
    """
    sizes = np.asarray(sizes, np.int64)
    levels = cluster_paths.shape[1]

    def level_sizes(level: int) -> np.ndarray:
        return np.bincount(cluster_paths[:, level], weights=sizes).astype(np.int64)

    quota = water_fill(level_sizes(levels - 1), target, rng)
    for level in range(levels - 2, -1, -1):
        child, parent = cluster_paths[:, level], cluster_paths[:, level + 1]
        child_sizes = level_sizes(level)
        parent_of = np.zeros(len(child_sizes), np.int64)
        parent_of[child] = parent
        child_quota = np.zeros(len(child_sizes), np.int64)
        for p in np.flatnonzero(quota):
            members = np.flatnonzero((parent_of == p) & (child_sizes > 0))
            child_quota[members] = water_fill(child_sizes[members], quota[p], rng)
        quota = child_quota
    return quota


def balanced_sample(
    paths: np.ndarray, d2: np.ndarray, target: int, strategy: str, seed: int
) -> np.ndarray:
    """Row indices of a balanced sample of ``target`` rows, each at most once, in memory
    (``pseudolabel curate`` draws the same quotas with the rows on Ray tasks).

    paths (n, L): each row's cluster at levels 1..L; d2 (n,): its squared distance to
    its level-1 centroid (for "closest").
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    rng = np.random.default_rng(seed)
    k1 = int(paths[:, 0].max()) + 1
    cluster_paths = np.zeros((k1, paths.shape[1]), np.int64)
    cluster_paths[paths[:, 0]] = paths  # clusters without rows keep 0s: they weigh 0
    cluster_paths[:, 0] = np.arange(k1)
    quota = sample_quotas(cluster_paths, np.bincount(paths[:, 0], minlength=k1), target, rng)
    keys = rng.random(len(d2)) if strategy == "random" else np.asarray(d2, np.float64)
    rows = np.arange(len(d2))
    return np.sort(cluster_samples(paths[:, 0], keys, rows, k1, quota))
