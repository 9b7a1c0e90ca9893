"""Initial centroids from a sample of the data.

k-means++ (Arthur & Vassilvitskii, "k-means++: The Advantages of Careful Seeding",
SODA 2007): the first centre is uniform, each next one is drawn with probability
proportional to D(x)^2, the squared distance to the nearest centre chosen so far.
The greedy variant (section 6 of the paper; scikit-learn's default) draws
L = 2 + floor(ln k) candidates per step and keeps the one that lowers sum D^2 most.
Its cost is O(n_sample * k * d) and sequential in k, so large k uses random seeding
(faiss's default) instead; ``resolve_init`` makes that choice explicit.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.ops.arrays import squared_norms
from pseudolabel.ops.scores import scores_from_dots, sq_distances_from_scores

# Above this k, "auto" seeds at random: k-means++ would cost k sequential passes.
KMEANSPP_MAX_K = 2048
# k-means++ draws from max(16 k, budget / (k d)) sample rows: at least 16 per centroid,
# and for small k as many as fit a fixed budget of rows x centroids x dims, its cost:
# 0.62-0.73 s on 2 cores for 16,384 rows, k = 256, d = 192 (2026-11-25, the image
# patches of bench.common.image_patches). There 4x the rows took 4x the time and ended
# 20 Lloyd iterations 0.01% and 0.12% higher (seeds 0, 1); 16 per centroid, 1.4% higher.
KMEANSPP_POINTS_PER_CENTROID = 16
KMEANSPP_WORK_BUDGET = 2**22 * 192
# Each step also costs O(rows) whatever d (the D^2 update, its cumulative sum): fewer
# dims than this count as this many, so low-dimensional data does not draw ever more rows.
KMEANSPP_MIN_DIMS = 64


def resolve_init(init: str, k: int) -> str:
    """ "auto" -> "kmeans++" for k <= KMEANSPP_MAX_K, else "random"."""
    if init == "auto":
        return "kmeans++" if k <= KMEANSPP_MAX_K else "random"
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be auto, kmeans++ or random, got {init!r}")
    return init


def init_sample_size(init: str, k: int, n: int, d: int) -> int:
    """Rows to draw from n rows of d dims to seed k centroids with ``init``."""
    if init == "random":
        return k
    dims = max(d, KMEANSPP_MIN_DIMS)
    return min(n, max(k * KMEANSPP_POINTS_PER_CENTROID, KMEANSPP_WORK_BUDGET // (k * dims)))


def kmeans_plusplus(
    x: np.ndarray, k: int, rng: np.random.Generator, trials: int | None = None
) -> np.ndarray:
    """Seed k centroids from x (n, d) by greedy D^2 sampling. Returns (k, d) float32.

    ``trials`` candidates per step (default 2 + floor(ln k); 1 is plain k-means++).
    When every point coincides with a chosen centre (D^2 sums to zero), the next centre
    is drawn uniformly among the points not chosen yet.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    trials = trials or 2 + int(np.log(k))
    sq_norms = squared_norms(x)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    min_d2 = _sq_dist(x, sq_norms, chosen[:1])[0]
    taken = np.zeros(n, dtype=bool)
    for j in range(1, k):
        # A chosen point's D^2 is 0 (the expansion below may leave rounding residue),
        # and stays 0 under the minimum with later candidates.
        taken[chosen[j - 1]] = True
        min_d2[chosen[j - 1]] = 0.0
        total = min_d2.sum(dtype=np.float64)
        if total <= 0:
            chosen[j] = rng.choice(np.flatnonzero(~taken))
            min_d2 = np.minimum(min_d2, _sq_dist(x, sq_norms, chosen[j : j + 1])[0])
            continue
        # Inverse-CDF draws of `trials` candidates with probability D^2 / sum D^2.
        cdf = np.cumsum(min_d2, dtype=np.float64)
        cand = np.searchsorted(cdf, rng.random(trials) * cdf[-1], side="right")
        cand = np.minimum(cand, n - 1)
        pot = _sq_dist(x, sq_norms, cand)  # (trials, n): D^2 if each candidate is added
        np.minimum(pot, min_d2, out=pot)
        pick = int(np.argmin(pot.sum(axis=1, dtype=np.float64)))
        chosen[j], min_d2 = cand[pick], pot[pick]
    return x[chosen].copy()


def _sq_dist(x: np.ndarray, sq_norms: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(len(idx), n) squared distances from the rows ``idx`` to every row of x: one sgemm
    on contiguous rows, then the expansion of ``ops.scores``."""
    s = scores_from_dots(x[idx] @ x.T, sq_norms[idx][:, None], "l2")
    return sq_distances_from_scores(s, sq_norms)


def random_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows of x (n, d), as faiss seeds its k-means. Returns (k, d) float32."""
    return np.ascontiguousarray(x[rng.choice(x.shape[0], k, replace=False)], dtype=np.float32)


def seed_centroids(x: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Dispatch on a resolved ``init`` ("kmeans++" or "random")."""
    if init == "kmeans++":
        return kmeans_plusplus(x, k, rng)
    return random_init(x, k, rng)
