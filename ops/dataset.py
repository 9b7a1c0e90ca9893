"""The worker protocol that the k-means loop is written against (DESIGN invariant 1).

Shaped after faiss's ``contrib.clustering.DatasetAssign``: the loop asks a dataset for
its size, a sample, and the statistics of one assignment step, and never for the rows.
``ArrayData`` is the in-process implementation; ``pipelines.shards.RayShardedData``
implements the same methods over Ray actors, so the same loop runs on a cluster.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ops.assign import CentroidIndex, normalize_rows
from ops.stats import PartialStats, partial_stats


@runtime_checkable
class ShardedData(Protocol):
    """What Lloyd's algorithm needs from the data."""

    def count(self) -> int: ...

    def dim(self) -> int: ...

    def sample(self, n: int, seed: int) -> np.ndarray:
        """(n, d) rows at ``sample_indices(count(), n, seed)``, in that order."""
        ...

    def partial_stats(self, centroids: np.ndarray) -> PartialStats: ...


@runtime_checkable
class StreamingData(ShardedData, Protocol):
    """What mini-batch k-means needs in addition: one pass over the data in batches."""

    def start_epoch(self, epoch: int) -> None: ...

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        """Statistics of the next mini-batch, or None once the epoch is exhausted."""
        ...


def sample_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """Sorted global row numbers of a uniform sample without replacement.

    Every backend draws its sample through this function, so the sample, and therefore
    the initial centroids, do not depend on how rows are split over workers.
    """
    n = min(n, n_total)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    return np.sort(rng.choice(n_total, size=n, replace=False))


class ArrayData:
    """An in-memory (n, d) matrix as a dataset. Rows are unit-normalised for "ip"."""

    def __init__(self, x: np.ndarray, metric: str = "l2", batch_rows: int = 65536, seed: int = 0):
        self.x = normalize_rows(x) if metric == "ip" else x
        self.metric = metric
        self.batch_rows = batch_rows
        self.seed = seed
        self._order: np.ndarray | None = None
        self._cursor = 0

    def count(self) -> int:
        return self.x.shape[0]

    def dim(self) -> int:
        return self.x.shape[1]

    def sample(self, n: int, seed: int) -> np.ndarray:
        return np.asarray(self.x[sample_indices(self.count(), n, seed)], dtype=np.float32)

    def partial_stats(self, centroids: np.ndarray) -> PartialStats:
        return partial_stats(self.x, CentroidIndex(centroids, self.metric))

    def start_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(2, epoch)))
        self._order = rng.permutation(self.count())
        self._cursor = 0

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        if self._order is None or self._cursor >= self.count():
            return None
        rows = np.sort(self._order[self._cursor : self._cursor + self.batch_rows])
        self._cursor += self.batch_rows
        return partial_stats(self.x[rows], CentroidIndex(centroids, self.metric))
