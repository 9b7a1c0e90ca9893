"""Initial centroids from a sample of the data.

k-means++ (Arthur & Vassilvitskii, "k-means++: The Advantages of Careful Seeding",
SODA 2007): the first centre is uniform, each next one is drawn with probability
proportional to D(x)^2, the squared distance to the nearest centre chosen so far.
Its cost is O(n_sample * k * d) and sequential in k, so large k uses random seeding
(faiss's default) instead; ``resolve_init`` makes that choice explicit.
"""

from __future__ import annotations

import numpy as np

# Above this k, "auto" seeds at random: k-means++ would cost k sequential passes.
KMEANSPP_MAX_K = 4096
# k-means++ draws from at most this many sample points per centroid.
KMEANSPP_POINTS_PER_CENTROID = 32


def resolve_init(init: str, k: int) -> str:
    """ "auto" -> "kmeans++" for k <= KMEANSPP_MAX_K, else "random"."""
    if init == "auto":
        return "kmeans++" if k <= KMEANSPP_MAX_K else "random"
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be auto, kmeans++ or random, got {init!r}")
    return init


def init_sample_size(init: str, k: int, n: int) -> int:
    """Rows to draw from the data to seed k centroids with ``init``."""
    if init == "random":
        return k
    return min(n, k * KMEANSPP_POINTS_PER_CENTROID)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Seed k centroids from x (n, d) by D^2 sampling. Returns (k, d) float32.

    When every remaining point coincides with a chosen centre (D^2 sums to zero), the
    next centre is drawn uniformly among the points not chosen yet.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    min_d2 = np.full(n, np.inf)
    taken = np.zeros(n, dtype=bool)
    for j in range(k):
        if j > 0:
            total = min_d2.sum()
            if total > 0:
                chosen[j] = rng.choice(n, p=min_d2 / total)
            else:
                chosen[j] = rng.choice(np.flatnonzero(~taken))
        c = x[chosen[j]]
        taken[chosen[j]] = True
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one matrix-vector product per centre.
        d2 = sq_norms - 2.0 * (x @ c) + sq_norms[chosen[j]]
        np.minimum(min_d2, np.maximum(d2, 0.0), out=min_d2)
        min_d2[taken] = 0.0
    return x[chosen].copy()


def random_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows of x (n, d), as faiss seeds its k-means. Returns (k, d) float32."""
    return np.ascontiguousarray(x[rng.choice(x.shape[0], k, replace=False)], dtype=np.float32)


def seed_centroids(x: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Dispatch on a resolved ``init`` ("kmeans++" or "random")."""
    if init == "kmeans++":
        return kmeans_plusplus(x, k, rng)
    return random_init(x, k, rng)
