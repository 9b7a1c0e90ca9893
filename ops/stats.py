"""Sufficient statistics of one k-means step: what a shard sends to the driver.

A shard reduces its rows to per-centroid sums (k, d) and counts (k,), plus its inertia.
These add across shards, so the driver never sees an embedding (DESIGN invariant 2).
Sums accumulate in float64 whatever the storage dtype (invariant 3).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pseudolabel.ops.arrays import iter_chunks
from pseudolabel.ops.scores import sq_distances_from_search


class NearestSearch(Protocol):
    """What ``partial_stats`` needs of an index (``ops.assign.CentroidIndex``). A protocol,
    not an import: ``ops.assign`` loads ``ops.gpu``, which imports this module."""

    k: int
    d: int
    metric: str
    rows_per_call: int  # rows handed to one search call

    def search(
        self, x: np.ndarray, m: int = 1, previous: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


# Rows converted to float64 at a time before the scatter-add. The buffer stays in cache,
# which makes an exact float64 accumulation cost about as much as a float32 one.
_ACCUMULATE_ROWS = 8192
# Rows per bincount of ``_bincount_sums``: its (rows x dims) cell indices stay in cache
# (2048 rows: 0.29 s per 1M x 128 rows, 8192: 0.36 s; measured 2026-11-25).
_BINCOUNT_ROWS = 2048


@dataclass
class PartialStats:
    """sums (k, d) float64, counts (k,) int64, inertia: sum of squared distances.

    ``changed`` of ``compared`` rows got another label than in the shard's previous
    step; rows without one (the first step, a restarted worker) are not compared.
    ``means``: where the workers already divided the summed sums by the counts (a
    reduce-scatter, ``ops.kmeans.cluster_means`` on each slice of the centroids), the
    (k, d) float32 result, kept on the workers (``ops.kmeans.HeldCentroids``), and
    ``sums`` is None: the driver never holds them.
    """

    sums: np.ndarray | None
    counts: np.ndarray
    inertia: float
    changed: int = 0
    compared: int = 0
    means: Any = None  # np.ndarray | ops.kmeans.HeldCentroids

    @classmethod
    def zeros(cls, k: int, d: int) -> PartialStats:
        return cls(np.zeros((k, d), np.float64), np.zeros(k, np.int64), 0.0)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def __add__(self, other: PartialStats) -> PartialStats:
        return reduce_stats([self, other])

    def split(self, bounds: list[tuple[int, int]]) -> list[PartialStats]:
        """The statistics of each slice [lo, hi) of the centroids (a reduce-scatter's
        parts); the scalars ride with the first slice, so that ``join_slices`` of the
        slices' sums is the whole."""
        # Views, not copies: each is serialised on its own, its rows only (they are
        # contiguous); a copy of k x d float64 costs as much again as the puts.
        scalars = [(self.inertia, self.changed, self.compared)] + [(0.0, 0, 0)] * len(bounds)
        return [
            PartialStats(self.sums[lo:hi], self.counts[lo:hi], *scalars[i])
            for i, (lo, hi) in enumerate(bounds)
        ]


def join_slices(slices: list[PartialStats], means: Any) -> PartialStats:
    """The whole step from its slices in centroid order, each reduced on its own worker
    to counts and scalars (sums None), with ``means``, the slices' means as the workers
    hold them: scalars add up."""
    return PartialStats(
        None,
        np.concatenate([s.counts for s in slices]),
        sum(s.inertia for s in slices),
        sum(s.changed for s in slices),
        sum(s.compared for s in slices),
        means=means,
    )


# Statistics are summed in a tree of at most this many parts a node (on the driver's
# cluster a node is a Ray task), always in the same grouping: ``tree_sum``.
REDUCE_FAN_IN = 8


def tree_sum(
    parts: list,
    add: Callable[[list], Any],
    last: Callable[[list], Any] | None = None,
    fan_in: int = REDUCE_FAN_IN,
) -> Any:
    """``add`` over groups of ``fan_in`` consecutive parts, level by level, then ``last``
    (default ``add``) over the last level's at most ``fan_in`` results. Floating-point
    sums depend on their grouping: every reduction that follows this one (Ray tasks in
    ``pipelines.runtime.shards``; one slice per worker in a reduce-scatter) gives the
    same bits for the same parts in the same order."""
    while len(parts) > fan_in:
        parts = [add(parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return (last or add)(parts)


def slice_bounds(k: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of ``parts`` contiguous slices of k centroids, sizes within one."""
    edges = np.linspace(0, k, parts + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(parts)]


def reduce_stats(parts: list[PartialStats]) -> PartialStats:
    """Sum shard statistics, in a fixed order so the result does not depend on timing."""
    if not parts:
        raise ValueError("no statistics to reduce")
    first = parts[0]
    total = PartialStats(
        first.sums.copy(), first.counts.copy(), first.inertia, first.changed, first.compared
    )
    for p in parts[1:]:
        total.sums += p.sums
        total.counts += p.counts
        total.inertia += p.inertia
        total.changed += p.changed
        total.compared += p.compared
    return total


@contextmanager
def _torch_single_thread(torch) -> Iterator[None]:
    """torch's OpenMP pool spins after each call and slows faiss's pool by ~15% when the
    two alternate (measured on 1M x 128, k = 1024); one thread adds in 0.05 s per 1M rows."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# A worker holding at least this many values (rows x dims) loads torch for its sums;
# below, numpy's bincount costs less than torch's import (1.6-2 s measured, 2026-11-25):
# it adds 1.8e-9 s per value and iteration over torch's index_add_ (0.295 s against
# 0.064 s per 1M x 128 rows), so 2^26 values break even at ~15 iterations.
TORCH_FROM_VALUES = 2**26


def sums_want_torch(values: int) -> bool:
    """Whether rows of ``values`` (rows x dims) are worth loading torch for their sums."""
    return values >= TORCH_FROM_VALUES


def accumulate_sums(x: np.ndarray, labels: np.ndarray, sums: np.ndarray) -> None:
    """sums[labels[i]] += x[i] for every row, in float64, in place.

    x (n, d) float32/float16, labels (n,) int64 in [0, k), sums (k, d) float64. With
    torch loaded (a worker of TORCH_FROM_VALUES values or more loads it), its
    index_add_; else numpy's bincount. Both add in float64 in row order, so the sums
    agree to float64 rounding; the choice does not depend on timing, as torch is
    imported before the first step or not at all (``ResidentRows``)."""
    torch = sys.modules.get("torch")
    if torch is None:
        _bincount_sums(x, labels, sums)
        return
    out = torch.from_numpy(sums)
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    buf = torch.empty((min(_ACCUMULATE_ROWS, len(x)), x.shape[1]), dtype=torch.float64)
    with _torch_single_thread(torch):
        for sl in iter_chunks(len(x), _ACCUMULATE_ROWS):
            m = sl.stop - sl.start
            buf[:m].copy_(torch.from_numpy(np.ascontiguousarray(x[sl])))
            out.index_add_(0, lab[sl], buf[:m])


def _bincount_sums(x: np.ndarray, labels: np.ndarray, sums: np.ndarray) -> None:
    """``accumulate_sums`` in numpy: one bincount over every (label, column) cell of a
    block of rows, summing in float64 in row order."""
    k, d = sums.shape
    cells = np.arange(d)
    for sl in iter_chunks(len(x), _BINCOUNT_ROWS):
        index = (np.asarray(labels[sl], np.int64)[:, None] * d + cells).ravel()
        weights = np.asarray(x[sl]).ravel()
        sums += np.bincount(index, weights=weights, minlength=k * d).reshape(k, d)


def partial_stats(
    x: np.ndarray,
    index: NearestSearch,
    chunk_rows: int | None = None,
    labels: np.ndarray | None = None,
) -> PartialStats:
    """Assign every row of x (n, d) to its nearest centroid and reduce to statistics.

    Inertia is the float64 sum of squared L2 distances (for the ``ip`` metric, of unit
    vectors: ``2 - 2 x.c``), so both metrics report the same objective. ``labels`` (n,)
    int, -1 where unknown, holds the rows' labels of the previous step: the search may
    start from them (``ops.neighbours``), changes are counted against them, and they
    are overwritten with this step's.
    """
    stats = PartialStats.zeros(index.k, index.d)
    for sl in iter_chunks(len(x), chunk_rows or index.rows_per_call):
        previous = None if labels is None else labels[sl]
        D, I = index.search(x[sl], 1, previous=previous)
        found = I[:, 0]
        stats.counts += np.bincount(found, minlength=index.k)
        stats.inertia += float(
            sq_distances_from_search(D[:, 0], index.metric).sum(dtype=np.float64)
        )
        accumulate_sums(x[sl], found, stats.sums)
        if previous is not None:
            known = previous >= 0
            stats.compared += int(known.sum())
            stats.changed += int((previous[known] != found[known]).sum())
            labels[sl] = found
    return stats
