"""Exact nearest-centroid search: the one place that calls faiss's brute-force kernels.

Distances follow faiss's conventions: squared L2 for ``metric="l2"`` and inner products
for ``metric="ip"`` (spherical k-means on unit vectors); ``ops.scores`` turns either
into squared L2. Rows may be stored as float16; they are widened to float32 one chunk at
a time, so memory stays O(chunk).
"""

from __future__ import annotations

import faiss
import numpy as np

from pseudolabel.ops.arrays import DEFAULT_CHUNK_ROWS, as_float32, iter_chunks
from pseudolabel.ops.scores import METRICS

FAISS_METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


class CentroidIndex:
    """Exact top-m search over k centroids.

    centroids (k, d) float32. Backends: CPU faiss (default), a faiss GPU index or torch
    on CUDA (see ``ops.gpu``); all return the same ``D, I`` up to float rounding.
    """

    def __init__(self, centroids: np.ndarray, metric: str = "l2", device: str = "cpu"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.centroids = as_float32(centroids)
        self.k, self.d = self.centroids.shape
        self.metric = metric
        self.device = device
        self._search = _make_backend(self.centroids, metric, device)

    rows_per_call = DEFAULT_CHUNK_ROWS

    def search(
        self,
        x: np.ndarray,
        m: int = 1,
        previous: np.ndarray | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> tuple[np.ndarray, np.ndarray]:
        """x (n, d) float32/float16 -> D (n, m) float32, I (n, m) int64, best first.
        ``previous`` (the rows' earlier labels) is what ``ops.neighbours`` starts from;
        an exact search needs none and ignores it."""
        n = x.shape[0]
        D = np.empty((n, m), dtype=np.float32)
        I = np.empty((n, m), dtype=np.int64)
        for sl in iter_chunks(n, chunk_rows):
            D[sl], I[sl] = self._search(as_float32(x[sl]), m)
        return D, I


def _make_backend(centroids: np.ndarray, metric: str, device: str):
    if device == "cpu":
        index = faiss.IndexFlat(centroids.shape[1], FAISS_METRICS[metric])
        index.add(centroids)
        return index.search
    from pseudolabel.ops import gpu  # CUDA only: keeps the GPU imports off the CPU path

    return gpu.make_search(centroids, metric, device)
