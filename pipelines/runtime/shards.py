"""The driver's side of the resident workers: ``ops.dataset`` over ShardWorker actors.

``ResidentShards`` implements ``ShardedData`` and ``ResamplableData``, so
``ops.kmeans.fit`` and ``ops.hierarchical.resample_refine`` run unchanged on a cluster.
Per iteration the driver puts the centroids once. It then receives k x d float64 sums
and k counts per worker, summed in a tree when there are many workers (DESIGN invariant
2); or, when those sums are large (``reduce_mode``), the workers reduce-scatter them: each
sends slice j of its sums to worker j, which sums and divides that slice and keeps the
means (``runtime.held``); the driver receives the k counts and the scalars, and passes
the slices' refs to the next step, whose workers fetch them from each other. The driver
fetches the centroids only to split empty clusters and once at the end of the fit.
Samples and selections travel as keys and row numbers; embeddings reach the driver only
as the seeding sample.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
import ray

from pseudolabel.ops.sampling import cluster_thresholds, smallest
from pseudolabel.ops.stats import (
    PartialStats,
    join_slices,
    reduce_stats,
    slice_bounds,
    tree_sum,
)
from pseudolabel.pipelines import progress
from pseudolabel.pipelines.config import REDUCES, SCATTER_FROM_BYTES
from pseudolabel.pipelines.io.plan import Plan, ReadSettings
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import (
    WorkerSpec,
    gather,
    start_actor,
    step_timeout,
    stop_actors,
    unanswered,
    wait_all,
    wait_ready,
)
from pseudolabel.pipelines.runtime.bookkeeping import as_argument
from pseudolabel.pipelines.runtime.held import HeldValue, SlicedCentroids
from pseudolabel.pipelines.runtime.sources import FileRows
from pseudolabel.pipelines.runtime.workers import ShardWorker
from pseudolabel.pipelines.runtime.workers.labels import FILE_ROWS

log = logging.getLogger("pseudolabel")

# A reduce-scatter step whose slices were lost with a node is run again, this often.
SCATTER_RETRIES = 3


def reduce_mode(reduce: str, workers: int, nodes: int, k: int, dim: int) -> str:
    """ "gather" or "scatter" for ``reduce``. "auto" scatters where the workers span
    several nodes and their sums (W x k x d x 8 bytes) reach SCATTER_FROM_BYTES: a
    gather then pulls all of them through the driver's link. On one node a gather reads
    them from shared memory, measured faster (``python -m bench.scale reduce``)."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if reduce == "auto":
        big = workers * k * dim * 8 >= SCATTER_FROM_BYTES
        return "scatter" if big and nodes > 1 else "gather"
    return reduce


@ray.remote
def _sum_stats(*parts: PartialStats) -> PartialStats:
    return reduce_stats(list(parts))


def tree_reduce(refs: list, timeout: float) -> PartialStats:
    """Sum statistics refs in ``ops.stats.tree_sum``'s grouping: Ray tasks of
    REDUCE_FAN_IN parts, the last level on the driver; every worker's answer within
    ``timeout`` seconds (``actors.gather``)."""
    wait_all(refs, timeout, "a step's statistics")  # the workers; the sums follow
    return tree_sum(
        refs,
        lambda group: calls.task(_sum_stats).remote(*group),
        lambda group: reduce_stats(gather(group, timeout, "a step's statistics")),
    )


def scatter_reduce(actors: list, centroids: Any, near: Any, k: int, timeout: float) -> PartialStats:
    """One step reduced on the workers: worker i splits its statistics into W slices of
    the centroids (``num_returns``), worker j sums slice j of all of them and divides
    (``ops.kmeans.reduce_slice``), keeping the means. The driver receives k counts and
    the scalars: ``PartialStats`` whose ``means`` are the slices held on the workers
    (``runtime.held.SlicedCentroids``), which the next step's workers fetch from each
    other. ``centroids`` and ``near`` are refs put by the driver, or held values."""
    bounds = slice_bounds(k, len(actors))
    for attempt in range(SCATTER_RETRIES + 1):
        try:
            sliced = [
                a.split_stats.options(num_returns=len(actors)).remote(centroids, bounds, near)
                for a in actors
            ]
            sliced = [[refs] if len(actors) == 1 else refs for refs in sliced]
            # No barrier here: a reducer fetches the slices of the workers that are done
            # while the others still compute. ``gather`` bounds the whole step.
            reduced = [
                a.reduce_slice.options(num_returns=2).remote(
                    centroids, lo, hi, *[refs[j] for refs in sliced]
                )
                for j, (a, (lo, hi)) in enumerate(zip(actors, bounds, strict=True))
            ]
            counts = gather([r[1] for r in reduced], timeout, "a step's reduce-scatter")
            means = SlicedCentroids([r[0] for r in reduced], bounds, actors, timeout)
            return join_slices(counts, means)
        except ray.exceptions.ObjectLostError as e:  # a node left with slices on it
            held = isinstance(centroids, SlicedCentroids)
            if attempt == SCATTER_RETRIES:
                if held and centroids.durable is None:
                    centroids.recover()  # raises: no checkpoint holds them
                raise
            log.warning("fit: a reduce-scatter lost its slices (%s); running the step again",
                        type(e).__name__)  # fmt: skip
            # The lost slices may be the step's input: read back from their checkpoint
            # where one holds them; else the step's parts alone were lost, or not.
            if held and centroids.durable is not None:
                centroids = centroids.recover()
            if isinstance(near, HeldValue):  # built beside them: the retry searches exactly
                near = None
    raise AssertionError("unreachable")


class ResidentShards:
    """ShardWorker actors that hold their rows, one per source."""

    def __init__(
        self,
        sources: list,
        settings: ReadSettings,
        spec: WorkerSpec,
        ledger=None,
        reduce: str = "auto",
    ):
        self.settings, self.spec, self.reduce = settings, spec, reduce
        ledger = as_argument(ledger)
        sizes = [s.size() for s in sources]
        with progress.bar(sum(sizes), "load", "row") as bar, calls.reporting(bar.update):
            # In this process a worker loads as it starts, counting its batches.
            self.actors = [start_actor(ShardWorker, spec, s, settings, spec, ledger)
                           for s in sources]  # fmt: skip
            ready = []  # on Ray a worker's rows count once it is ready

            def on_ready(i: int) -> None:
                ready.append(sizes[i])
                bar.reach(sum(ready))

            self.infos = wait_ready(self.actors, spec, on_ready)
        self._warm = False  # torch loaded in every worker (``warm_up``)
        self._epoch, self._batch = (0, 0), 0  # mini-batch: (epoch, batches), the next batch

    def warm_up(self) -> None:
        """Before the first step: wait, within --startup-timeout, for the workers' torch,
        which loads while the driver seeds (``ResidentRows.warm``)."""
        if not self._warm:
            wait_ready(self.actors, self.spec, method="warm")
            self._warm = True

    def reduce_mode(self, k: int) -> str:
        """How a step against ``k`` centres is reduced: ``reduce_mode`` for these workers."""
        nodes = len({i["node"] for i in self.infos})
        return reduce_mode(self.reduce, len(self.actors), nodes, k, self.dim())

    def timeout(self, k: int) -> float:
        """Seconds to wait for one step against ``k`` centres (``actors.step_timeout``)."""
        rows = max((i["rows"] for i in self.infos), default=0)
        return step_timeout(self.spec.task_timeout, rows, k, self.settings.dim)

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        settings: ReadSettings,
        spec: WorkerSpec,
        workers: int,
        ledger=None,
        reduce: str = "auto",
    ) -> ResidentShards:
        assignment = plan.split(workers)
        if len(assignment) < workers:
            log.info(
                "input splits into %d pieces: using %d workers, not %d",
                len(assignment),
                len(assignment),
                workers,
            )
        sources = [FileRows(tuple(s)) for s in assignment]
        return cls(sources, settings, spec, ledger, reduce)

    def count(self) -> int:
        return sum(i["rows"] for i in self.infos)

    def dim(self) -> int:
        return self.settings.dim

    def sample(self, n: int, seed: int) -> np.ndarray:
        return keyed_sample(self.actors, n, seed, self.settings.dim, self.timeout(1))

    def partial_stats(self, centroids: np.ndarray | SlicedCentroids, near=None) -> PartialStats:
        """One step; with ``near`` (a ``CentroidGraph``) each worker scores its rows near
        their labels of its previous step. Reduced by a gather or, for large sums, a
        reduce-scatter (``reduce_mode``), whose means stay on the workers. Centroids and
        graph are put once, or passed on where they are held (``runtime.held``)."""
        k, timeout = len(centroids), self.timeout(len(centroids))
        self.warm_up()
        if isinstance(centroids, np.ndarray):
            centroids = calls.put(np.ascontiguousarray(centroids, np.float32))
        if near is not None and not isinstance(near, HeldValue):
            near = calls.put(near.without_centroids())  # the workers have them
        if self.reduce_mode(k) == "scatter":
            return scatter_reduce(self.actors, centroids, near, k, timeout)
        refs = [a.partial_stats.remote(centroids, None, near) for a in self.actors]
        return tree_reduce(refs, timeout)

    def start_epoch(self, epoch: int) -> None:
        """Mini-batch k-means over the resident rows (in this process; on Ray the rows
        stream, ``runtime.streaming``): ``epoch`` cut into batches of about --batch-rows
        rows a worker, each worker cutting its own rows by the same keys, so a batch is
        the same rows for any split (``ops.sampling.epoch_batches``)."""
        per_step = self.spec.batch_rows * len(self.actors)
        self._epoch = (epoch, max(1, -(-self.count() // per_step)))
        self._batch = 0

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        """The statistics of the epoch's next non-empty batch, summed over the workers;
        None once the epoch is done."""
        epoch, batches = self._epoch
        self.warm_up()
        ref = calls.put(np.ascontiguousarray(centroids, np.float32))
        while self._batch < batches:
            batch, self._batch = self._batch, self._batch + 1
            refs = [a.next_batch_stats.remote(ref, epoch, batch, self.spec.seed, batches)
                    for a in self.actors]  # fmt: skip
            stats = tree_reduce(refs, self.timeout(len(centroids)))
            if stats.n:
                return stats
        return None

    def cluster_subset(
        self, centroids: np.ndarray, per_cluster: int, strategy: str, seed: int
    ) -> ShardSubset:
        """Up to per_cluster rows of every cluster, kept on the workers."""
        c = np.ascontiguousarray(centroids, np.float32)
        problem = {"centroids": c, "per_cluster": per_cluster, "strategy": strategy, "seed": seed}
        ref = calls.put(problem)
        timeout = self.timeout(len(c))
        parts = gather([a.cluster_candidates.remote(ref) for a in self.actors], timeout, "a subset")
        labels, keys, rows = (np.concatenate([p[i] for p in parts]) for i in range(3))
        key_t, row_t = cluster_thresholds(labels, keys, rows, len(c), per_cluster)
        selection = {**problem, "key_t": key_t, "row_t": row_t, "token": uuid.uuid4().hex}
        selection_ref = calls.put(selection)
        counts = gather([a.select.remote(selection_ref) for a in self.actors], timeout, "a subset")
        return ShardSubset(self, selection_ref, sum(counts))

    def write_labels(
        self, centroids: str, k: int, spec: Any, staging: Any, batch_rows: int, roster=None
    ) -> int:
        """Each worker labels the rows it holds into files of at most FILE_ROWS rows under
        ``staging`` (``workers.labels``): ``centroids`` (a URL of k centres) with ``spec``
        (a ``runtime.labelling.LabelSpec``). Returns the rows written; the bar moves file
        by file on Ray, batch by batch in this process. It fails once no file was
        written for as long as a step may take, or a worker's rebuild
        (--startup-timeout), whichever is longer."""
        options, who = self.settings.storage_options, as_argument(roster)
        stall = max(self.timeout(k), self.spec.startup_timeout)
        with progress.bar(self.count(), "label", "row") as bar, calls.reporting(bar.update):
            refs = []  # in this process each call runs here, its batches moving the bar
            for i, (actor, info) in enumerate(zip(self.actors, self.infos, strict=True)):
                for lo in range(0, info["rows"], FILE_ROWS):
                    target = staging.join(f"w{i:05d}-{lo // FILE_ROWS:05d}.parquet")
                    hi = min(lo + FILE_ROWS, info["rows"])
                    call = actor.write_labels.remote(
                        centroids, spec, options, target, (lo, hi, info["rows"]), batch_rows, who
                    )
                    refs.append(call)
            pending, written = list(refs), 0
            while pending:
                done, pending = calls.wait(pending, num_returns=1, timeout=stall)
                if not done:
                    raise unanswered(len(pending), len(refs), "their rows' labels", stall)
                written += calls.get(done[0])
                bar.reach(written)  # in this process the batches have counted already
        return written

    def shutdown(self) -> None:
        stop_actors(self.actors, self.spec)
        self.actors = []


class ShardSubset:
    """A selection of the workers' rows (``ResidentShards.cluster_subset``) as a dataset."""

    def __init__(self, shards: ResidentShards, selection: Any, rows: int):
        self.shards, self.selection, self.rows = shards, selection, rows

    def count(self) -> int:
        return self.rows

    def dim(self) -> int:
        return self.shards.dim()

    def sample(self, n: int, seed: int) -> np.ndarray:
        timeout = self.shards.timeout(1)
        return keyed_sample(self.shards.actors, n, seed, self.dim(), timeout, self.selection)

    def partial_stats(self, centroids: np.ndarray, near=None) -> PartialStats:
        """One step on the selection. ``near`` is not used: a selection keeps no labels,
        and the refinement's subsets are small."""
        self.shards.warm_up()
        ref = calls.put(np.ascontiguousarray(centroids, np.float32))
        refs = [a.partial_stats.remote(ref, self.selection) for a in self.shards.actors]
        return tree_reduce(refs, self.shards.timeout(len(centroids)))


def keyed_sample(
    actors: list, n: int, seed: int, dim: int, timeout: float, selection: Any = None
) -> np.ndarray:
    """The n rows with the smallest sampling keys over all workers, in global row order
    (``ops.dataset.ShardedData.sample``): keys first, then only the chosen rows."""
    parts = gather([a.sample_candidates.remote(n, seed, selection) for a in actors], timeout,
                   "a sample")  # fmt: skip
    keys = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    owner = np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(parts)])
    picked = smallest(keys, rows, n)
    refs = [
        actors[i].rows_at.remote(np.sort(rows[picked][owner[picked] == i]))
        for i in np.unique(owner[picked])
    ]
    found = gather(refs, timeout, "a sample")
    if not found:
        return np.empty((0, dim), np.float32)
    got_rows = np.concatenate([f[0] for f in found])
    x = np.concatenate([f[1] for f in found])
    return x[np.argsort(got_rows, kind="stable")]
