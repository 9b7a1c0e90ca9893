"""Values a reduce-scatter leaves on the cluster: the driver holds refs, not the values.

``SlicedCentroids`` is ``ops.kmeans.HeldCentroids`` on Ray: slice j of the k centroids
is the object that reducer j returned, in the object store of its node and owned by the
driver. Each worker fetches every slice for its next step (an all-gather between the
workers); the driver fetches them when a split of empty clusters needs the rows, and
once at the end of the fit. ``HeldValue`` is anything computed beside them (the
approximate search's neighbour graph) and passed on as a ref.

Refs travel inside these objects (not as top-level arguments), so the workers that
receive them fetch them with ``fetch_held``. The work on them runs on the workers that
hold them (``holders``), already started and with their imports loaded: a Ray task
starts a process each time on a cluster whose CPUs the workers hold (Ray stops idle
workers above its soft limit). Measured on 2 cores (k = 65536, d = 128): the graph took
2.0-2.2 s as a task, 1.1-1.2 s on a worker.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from pseudolabel.pipelines.errors import PseudolabelError
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import gather
from pseudolabel.pipelines.runtime.session import local_cpus

log = logging.getLogger("pseudolabel")


class HeldValue:
    """A value left where a worker computed it (``SlicedCentroids.derive``)."""

    def __init__(self, ref: Any):
        self.ref = ref

    def fetch(self) -> Any:
        return calls.get(self.ref)


def fetch_held(value: Any) -> Any:
    """On a worker: ``value`` itself, or the value a ``HeldValue`` or ``SlicedCentroids``
    stands for. A lost slice raises here; the driver's step reads it back (``recover``)."""
    if isinstance(value, SlicedCentroids):
        return value.fetch_range(0, len(value))
    return value.fetch() if isinstance(value, HeldValue) else value


class SlicedCentroids:
    """k centroids as contiguous slices ``bounds`` (``ops.stats.slice_bounds``), slice j
    the object ``refs[j]``, returned by the worker ``holders[j]``; ``fns`` are row-wise
    functions still to apply to every row (``map_rows``). ``durable``: where a
    checkpoint wrote these centroids, a file per slice with ``fns`` applied (``write``),
    from which a lost slice is read back (``recover``). The driver's waits on them end
    after ``timeout`` seconds (``actors.gather``)."""

    def __init__(
        self,
        refs: Sequence[Any],
        bounds: Sequence[tuple[int, int]],
        holders: Sequence[Any],
        timeout: float,
        fns: tuple[Callable[[np.ndarray], np.ndarray], ...] = (),
        durable: list | None = None,
    ):
        self.refs, self.bounds, self.holders = list(refs), list(bounds), list(holders)
        self.timeout, self.fns, self.durable = timeout, fns, durable

    def __len__(self) -> int:
        return self.bounds[-1][1]

    @property
    def slices(self) -> int:
        return len(self.refs)

    def fetch(self) -> np.ndarray:
        """All of them, on the driver (``ops.kmeans.HeldCentroids``): read back from their
        checkpoint if a slice was lost."""
        try:
            rows = gather(self.refs, self.timeout, "the centroids")
        except ray.exceptions.ObjectLostError:
            if self.durable is None:
                raise
            log.warning("fit: the centroids' slices were lost; reading their checkpoint")
            return self.recover().fetch()
        return finished(np.concatenate(rows), self.fns)

    def fetch_range(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi), fetching only the slices that hold them (a reducer's own slice
        when the bounds match; an empty one when there are more slices than rows)."""
        inside = [j for j, (a, b) in enumerate(self.bounds) if a < hi and b > lo]
        inside = inside or [next(j for j, (a, b) in enumerate(self.bounds) if a <= lo <= b)]
        rows = np.concatenate(calls.get([self.refs[j] for j in inside]))
        start = self.bounds[inside[0]][0]
        return finished(rows[lo - start : hi - start], self.fns)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> SlicedCentroids:
        # ``durable`` holds ``fns`` applied: it does not hold ``fn`` applied
        return SlicedCentroids(self.refs, self.bounds, self.holders, self.timeout,
                               (*self.fns, fn))  # fmt: skip

    def derive(self, fn: Callable[..., Any], *args: Any) -> HeldValue:
        """``fn`` on the first slice's worker (``workers.rows.ResidentRows.derive``)."""
        return HeldValue(self.holders[0].derive.remote(fn, self, *args))

    def write(self, locations: list) -> None:
        """Each slice, its rows finished, to its location, by the worker that holds it;
        then ``recover`` can read them back. Every worker must reach the locations, as
        for the labels they write (``workers.labels``)."""
        if len(locations) != len(self.refs):
            raise ValueError(f"{len(self.refs)} slices, {len(locations)} locations")
        pieces = zip(self.holders, locations, self.refs, strict=True)
        refs = [holder.write_slice.remote(loc, self.fns, ref) for holder, loc, ref in pieces]
        gather(refs, self.timeout, "a checkpoint's centroids")
        self.durable = list(locations)

    def recover(self) -> SlicedCentroids:
        """These centroids read back from the checkpoint that wrote them (``write``),
        after a node left with some of their slices: each slice read by a task (its
        holder may be gone with the node)."""
        if self.durable is None:
            raise PseudolabelError(
                "the centroids of the last iteration were lost with a node and no "
                "checkpoint holds them (the fit runs without checkpoints): rerun"
            )
        read = calls.task(_read_rows).options(num_cpus=0)
        return SlicedCentroids([read.remote(loc) for loc in self.durable], self.bounds,
                               self.holders, self.timeout, (), self.durable)  # fmt: skip


def finished(rows: np.ndarray, fns: tuple) -> np.ndarray:
    """``rows`` with the row-wise functions a ``SlicedCentroids`` still owes applied."""
    for fn in fns:
        rows = fn(rows)
    return rows


def derive_with_all_cores(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on every core of this node: the other workers wait for it between
    steps, their CPUs idle, as the driver's cores were when it built the graph (on one
    thread: 2.5 s against 1.2-1.4 s for the graph of k = 65536, d = 128 on 2 cores)."""
    import faiss
    from threadpoolctl import threadpool_limits

    before, cores = faiss.omp_get_max_threads(), local_cpus()
    faiss.omp_set_num_threads(cores)
    try:
        with threadpool_limits(cores):
            return fn(*args)
    finally:
        faiss.omp_set_num_threads(before)


@ray.remote
def _read_rows(location: Any) -> np.ndarray:
    return np.load(io.BytesIO(location.read_bytes()), allow_pickle=False)
