"""The worker protocol that the k-means loop is written against (DESIGN invariant 1).

Shaped after faiss's ``contrib.clustering.DatasetAssign``: the loop asks a dataset for
its size, a sample, and the statistics of one assignment step, and never for the rows.
``ArrayData`` is the in-process implementation; ``pipelines.runtime`` implements the same
methods over Ray actors, so the same loop runs on a cluster.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.bounds import DriftBounds, bounded_partial_stats
from pseudolabel.ops.sampling import cluster_samples, epoch_batches, row_keys, smallest
from pseudolabel.ops.scores import sq_distances_from_search
from pseudolabel.ops.stats import PartialStats, partial_stats, sums_want_torch

STRATEGIES = ("random", "closest")


class EpochLost(RuntimeError):
    """Raised by ``StreamingData.next_batch_stats`` when part of the epoch's rows can no
    longer be delivered (a streaming worker was rebuilt and its place in the stream is
    gone). The loop starts the epoch again from the state it began with, so no epoch
    silently skips rows."""


@runtime_checkable
class ShardedData(Protocol):
    """What Lloyd's algorithm needs from the data."""

    def count(self) -> int: ...

    def dim(self) -> int: ...

    def sample(self, n: int, seed: int) -> np.ndarray:
        """(n, d) float32: the rows with the n smallest ``ops.sampling.row_keys``, in
        global row order, so a sample (and the seeding drawn from it) does not depend
        on how rows are split over workers."""
        ...

    def partial_stats(self, centroids: np.ndarray, near=None) -> PartialStats:
        """Statistics of one assignment step. ``near``: an ``ops.neighbours.CentroidGraph``
        of ``centroids``; the data then scores each row near its label of the previous
        step (which it keeps), or finds a start for rows that have none."""
        ...


@runtime_checkable
class StreamingData(ShardedData, Protocol):
    """What mini-batch k-means needs in addition: one pass over the data in batches."""

    def start_epoch(self, epoch: int) -> None:
        """Begin (or, after an ``EpochLost``, begin again) one pass over every row."""
        ...

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        """Statistics of the next mini-batch, or None once the epoch is exhausted;
        raises ``EpochLost`` when the epoch cannot deliver all its rows any more."""
        ...


@runtime_checkable
class ResamplableData(ShardedData, Protocol):
    """What the resampling refinement needs: a view of up to ``per_cluster`` rows of
    every cluster of ``centroids``, on which the same loop runs."""

    def cluster_subset(
        self, centroids: np.ndarray, per_cluster: int, strategy: str, seed: int
    ) -> ShardedData: ...


def labelled_stats(
    x: np.ndarray,
    centroids: np.ndarray,
    metric: str,
    labels: np.ndarray,
    bounds: DriftBounds,
    near=None,
) -> PartialStats:
    """One step over rows that keep their labels between steps: near the last labels
    with ``near`` (an ``ops.neighbours.CentroidGraph``), else exact, skipping the rows
    that Hamerly's bounds settle once labels barely move (``ops.bounds``). The
    approximate search moves labels the bounds do not follow: it voids them."""
    if near is not None:
        bounds.centroids, bounds.engaged = None, False
        return partial_stats(x, near, labels=labels)
    return bounded_partial_stats(x, CentroidIndex(centroids, metric), bounds)


def cluster_keys(
    x: np.ndarray,
    rows: np.ndarray,
    centroids: np.ndarray,
    metric: str,
    strategy: str,
    seed: int,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, keys) of rows x (n, d) with global row numbers ``rows``: the nearest
    centroid, and the key that ranks rows within it (the squared distance for
    "closest", a random key for "random")."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    D, I = CentroidIndex(centroids, metric, device).search(x)
    if strategy == "closest":
        return I[:, 0], sq_distances_from_search(D[:, 0], metric).astype(np.float64)
    return I[:, 0], row_keys(rows, seed)


class ArrayData:
    """An in-memory (n, d) matrix as a dataset. Rows are unit-normalised for "ip".

    ``rows`` are the global row numbers (default 0..n-1, sorted); samples and subsets
    are defined on them, as on the Ray workers.
    """

    def __init__(
        self,
        x: np.ndarray,
        metric: str = "l2",
        batch_rows: int = 65536,
        seed: int = 0,
        rows: np.ndarray | None = None,
    ):
        self.x = normalize_rows(x) if metric == "ip" else x
        if sums_want_torch(x.size):
            import torch  # noqa: F401  (the sums' index_add_: ops.stats.accumulate_sums)
        self.metric = metric
        self.batch_rows = batch_rows
        self.seed = seed
        self.rows = np.arange(len(x), dtype=np.int64) if rows is None else rows
        self._batches: list[np.ndarray] = []  # the epoch's batches not yet taken
        self.labels = np.full(len(x), -1, np.int32)  # of the last partial_stats, -1: none
        self.bounds = DriftBounds(self.labels)  # exact steps skip settled rows

    def count(self) -> int:
        return self.x.shape[0]

    def dim(self) -> int:
        return self.x.shape[1]

    def sample(self, n: int, seed: int) -> np.ndarray:
        picked = smallest(row_keys(self.rows, seed), self.rows, n)
        return np.asarray(self.x[picked], dtype=np.float32)

    def partial_stats(self, centroids: np.ndarray, near=None) -> PartialStats:
        return labelled_stats(self.x, centroids, self.metric, self.labels, self.bounds, near)

    def cluster_subset(
        self, centroids: np.ndarray, per_cluster: int, strategy: str, seed: int
    ) -> ArrayData:
        labels, keys = cluster_keys(self.x, self.rows, centroids, self.metric, strategy, seed)
        picked = np.sort(cluster_samples(labels, keys, self.rows, len(centroids), per_cluster))
        # Rows are already unit vectors for "ip": the subset keeps them as they are.
        subset = ArrayData(self.x[picked], "l2", self.batch_rows, self.seed, self.rows[picked])
        subset.metric = self.metric
        return subset

    def start_epoch(self, epoch: int) -> None:
        """The epoch's batches of about ``batch_rows`` rows (``ops.sampling.epoch_batches``
        on the global row numbers: the batches of ``pseudolabel run``'s in-process worker
        holding these rows)."""
        batches = -(-self.count() // self.batch_rows)
        self._batches = [b for b in epoch_batches(self.rows, self.seed, epoch, batches) if len(b)]

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        if not self._batches:
            return None
        return batch_stats(self.x, self._batches.pop(0), centroids, self.metric)


def batch_stats(
    x: np.ndarray, positions: np.ndarray, centroids: np.ndarray, metric: str, device: str = "cpu"
) -> PartialStats:
    """One mini-batch's statistics: the rows of x at ``positions`` (ascending)."""
    return partial_stats(x[positions], CentroidIndex(centroids, metric, device))
