"""Exact nearest-centroid search: the one place that calls faiss's brute-force kernels.

Distances follow faiss's conventions: squared L2 for ``metric="l2"`` and inner products
for ``metric="ip"`` (spherical k-means on unit vectors). Rows may be stored as float16;
they are widened to float32 one chunk at a time, so memory stays O(chunk).
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}

# Rows per faiss call. faiss blocks queries internally (4096 rows per BLAS call), so this
# only bounds the float32 copy of a float16 chunk and the (chunk, m) result buffers.
DEFAULT_CHUNK_ROWS = 65536


def iter_chunks(n: int, chunk_rows: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_rows`` rows covering ``range(n)``."""
    for start in range(0, n, chunk_rows):
        yield slice(start, min(start + chunk_rows, n))


def as_float32(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view of ``x`` (a copy only when needed)."""
    return np.ascontiguousarray(x, dtype=np.float32)


class CentroidIndex:
    """Exact top-m search over k centroids.

    centroids (k, d) float32. Backends: CPU faiss (default), a faiss GPU index or torch
    on CUDA (see ``ops.gpu``); all return the same ``D, I`` up to float rounding.
    """

    def __init__(self, centroids: np.ndarray, metric: str = "l2", device: str = "cpu"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        self.centroids = as_float32(centroids)
        self.k, self.d = self.centroids.shape
        self.metric = metric
        self.device = device
        self._search = _make_backend(self.centroids, metric, device)

    def search(
        self, x: np.ndarray, m: int = 1, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> tuple[np.ndarray, np.ndarray]:
        """x (n, d) float32/float16 -> D (n, m) float32, I (n, m) int64, best first."""
        n = x.shape[0]
        D = np.empty((n, m), dtype=np.float32)
        I = np.empty((n, m), dtype=np.int64)
        for sl in iter_chunks(n, chunk_rows):
            D[sl], I[sl] = self._search(as_float32(x[sl]), m)
        return D, I


def _make_backend(centroids: np.ndarray, metric: str, device: str):
    if device == "cpu":
        index = faiss.IndexFlat(centroids.shape[1], METRICS[metric])
        index.add(centroids)
        return index.search
    from ops import gpu  # CUDA only; keeps torch/faiss-GPU imports off the CPU path

    return gpu.make_search(centroids, metric, device)


def squared_distances(D: np.ndarray, metric: str) -> np.ndarray:
    """Turn search results into squared L2 distances.

    For ``ip`` the rows and centroids are unit vectors, so ``|x - c|^2 = 2 - 2 x.c``.
    """
    if metric == "l2":
        return np.maximum(D, 0.0)
    return np.maximum(2.0 - 2.0 * D, 0.0)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32). Prior validation: no zero rows."""
    x = np.array(x, dtype=np.float32, copy=True)
    faiss.normalize_L2(x)
    return x
