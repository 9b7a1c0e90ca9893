"""ShardWorker actors and the driver-side dataset that fans out to them.

``RayShardedData`` implements ``ops.dataset.ShardedData`` (and ``StreamingData``) over
long-lived actors, so ``ops.kmeans.fit`` runs unchanged on a cluster. Per iteration the
driver puts the centroids once and receives k x d float64 sums and k counts per worker,
summed in a tree when there are many workers (DESIGN invariant 2).

A worker's state derives from its constructor arguments alone (its shards, or its Ray
Data split), so an actor that Ray restarts after a lost node is a correct one
(invariant 8); its methods are pure functions of their arguments and may be retried.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import faiss
import numpy as np
import ray

from ops.assign import CentroidIndex, normalize_rows
from ops.dataset import sample_indices
from ops.hierarchical import cluster_samples, nearest_cluster_samples
from ops.sinkhorn import RowBlock
from ops.stats import PartialStats, partial_stats, reduce_stats
from pipelines.cluster import limit_threads
from pipelines.errors import InputError, PseudolabelError, ResourceError
from pipelines.reader import Plan, ReadSettings, Shard, iter_batches

log = logging.getLogger("pseudolabel")

# Above this many workers the driver sums their statistics in a tree of Ray tasks,
# each adding at most this many, instead of receiving every k x d matrix itself.
REDUCE_FAN_IN = 8


@dataclass(frozen=True)
class WorkerSpec:
    metric: str  # "l2", or "ip" for spherical k-means (rows unit-normalised at load)
    device: str = "cpu"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3
    batch_rows: int = 16384  # mini-batch rows per step
    startup_timeout: float = 600.0  # seconds to wait for resources and loading
    threads: int | None = None  # faiss threads; None: Ray's OMP_NUM_THREADS


class ShardWorker:
    """Rows of some shards in memory, or a Ray Data split streamed in mini-batches."""

    def __init__(self, shards: list[Shard], settings: ReadSettings, spec: WorkerSpec, stream=None):
        limit_threads(spec.threads)
        # torch (the float64 scatter-add) loads in ~1 s: start it now, in the background,
        # so the actor is ready while the driver seeds; its first use waits if needed.
        threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
        self.spec = spec
        self.settings = settings
        self.stream = stream
        self.skipped: Counter = Counter()
        self._batches = None
        self._pending: list[np.ndarray] = []  # batches read for seeding, not yet used
        self.device_rows = None  # rows on the GPU, for --gpus-per-worker
        self._epoch: int | None = None
        # A constructor exception reaches the driver only as "actor died": keep it and
        # raise it from info(), where it arrives as itself (file, row, column).
        self.error: Exception | None = None
        if stream is None:
            try:
                self._load(shards)
            except PseudolabelError as e:
                self.error = e
        else:
            self.x = np.empty((0, settings.dim), settings.dtype)
            self.rows = np.empty(0, np.int64)

    def _load(self, shards: list[Shard]) -> None:
        n = sum(s.rows for s in shards)
        x = np.empty((n, self.settings.dim), self.settings.dtype)
        rows = np.empty(n, np.int64)
        filled = 0
        for shard in shards:
            # The same columns as the label pass reads (ids too, though unused here), so
            # both passes meet the same bad rows and skip the same ones.
            for batch in iter_batches(shard, self.settings):
                m = len(batch.x)
                x[filled : filled + m] = batch.x
                rows[filled : filled + m] = batch.rows
                filled += m
                self.skipped.update(batch.skipped)
        self.x, self.rows = x[:filled], rows[:filled]
        if self.spec.metric == "ip":
            self._reject_zero_rows()
            self.x = normalize_rows(self.x).astype(self.settings.dtype, copy=False)
        if self.spec.device == "cuda":  # rows stay on the GPU for every iteration
            from ops.gpu import DeviceRows, backend

            self.device_rows = DeviceRows(self.x, "cuda")
            log.info(
                "worker: %d rows on the GPU in %s (search: %s)",
                len(self.x),
                self.device_rows.dtype,
                backend(),
            )

    def _reject_zero_rows(self) -> None:
        norms = np.einsum("ij,ij->i", self.x, self.x, dtype=np.float64)
        zero = norms == 0
        if zero.any():
            if self.settings.on_bad_rows == "error":
                raise InputError(
                    f"global row {int(self.rows[zero][0])}: all-zero embedding cannot be "
                    "unit-normalised for --spherical; use --on-bad-rows skip to drop it"
                )
            self.skipped["zero embedding (spherical)"] += int(zero.sum())
            self.x, self.rows = self.x[~zero], self.rows[~zero]

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return {
            "rows": len(self.x),
            "skipped": dict(self.skipped),
            "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "pid": os.getpid(),
            "threads": faiss.omp_get_max_threads(),
            "device": self.spec.device,
            "rows_dtype": self.device_rows.dtype if self.device_rows else str(self.x.dtype),
        }

    def rows_at(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found global rows, their embeddings) for sorted global row numbers."""
        pos = np.searchsorted(self.rows, global_rows)
        pos = pos[pos < len(self.rows)]
        hit = pos[np.isin(self.rows[pos], global_rows)]
        return self.rows[hit], np.asarray(self.x[hit], np.float32)

    def partial_stats(self, centroids: np.ndarray) -> PartialStats:
        if self.device_rows is not None:
            return self.device_rows.partial_stats(centroids, self.spec.metric)
        return partial_stats(self.x, CentroidIndex(centroids, self.spec.metric, self.spec.device))

    def cluster_samples(
        self, centroids: np.ndarray, per_cluster: int, strategy: str, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, squared distances, rows): up to per_cluster of this worker's rows in
        every cluster, for the resampling refinement."""
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(self.rows[0]),)))
        rows, labels, d2 = nearest_cluster_samples(
            self.x, centroids, self.spec.metric, per_cluster, strategy, rng, self.spec.device
        )
        return labels, d2, np.asarray(self.x[rows], np.float32)

    # -- Sinkhorn: the row side of the balanced assignment (ops.sinkhorn.RowBlock) --
    # Every call carries what the block needs (centroids, beta, eps, a stage token), so
    # an actor that Ray restarted, which has lost its block, rebuilds it and answers.

    def _block(self, problem: dict, stage: tuple | None) -> RowBlock:
        block = getattr(self, "_row_block", None)
        if block is None:
            c = problem["centroids"]
            cache = 2 * len(self.x) * len(c) * 4 <= problem["cache_bytes"]
            block = RowBlock(self.x, c, self.spec.metric, problem["rows"], cache=cache)
            self._row_block, self._stage = block, None
        if stage is not None and stage[0] != self._stage:
            block.prepare(stage[1], stage[2])
            self._stage = stage[0]
        return block

    def sinkhorn_moments(self, problem: dict) -> tuple[np.ndarray, bool]:
        block = self._block(problem, None)
        return block.score_moments(), block.S is not None

    def sinkhorn_column_sums(self, v: np.ndarray, problem: dict, stage: tuple) -> np.ndarray:
        return self._block(problem, stage).column_sums(v)

    def sinkhorn_release(self) -> None:
        self._row_block = None

    def start_epoch(self, epoch: int) -> None:
        """Begin pulling this worker's split for ``epoch`` (a no-op if already begun)."""
        if self._epoch == epoch and self._batches is not None:
            return
        self._epoch = epoch
        self._pending = []
        self._batches = iter(
            self.stream.iter_batches(
                batch_size=self.spec.batch_rows,
                batch_format="numpy",
                local_shuffle_buffer_size=4 * self.spec.batch_rows,
                local_shuffle_seed=epoch,
            )
        )

    def _next_rows(self) -> np.ndarray | None:
        if self._pending:
            return self._pending.pop(0)
        batch = next(self._batches, None) if self._batches is not None else None
        if batch is None:
            self._batches = None
            return None
        x = batch["embedding"]
        return normalize_rows(x) if self.spec.metric == "ip" else x

    def stream_sample(self, n: int, seed: int) -> np.ndarray:
        """A uniform sample of n rows from the first batches of epoch 0, which are kept
        for the first steps: seeding reads nothing extra and skips no row."""
        self.start_epoch(0)
        held, rows = [], 0
        while rows < n and (x := self._next_rows()) is not None:
            held.append(x)
            rows += len(x)
        self._pending = held
        if not held:
            return np.empty((0, self.settings.dim), np.float32)
        pool = np.concatenate(held)
        pick = np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False)
        return np.asarray(pool[np.sort(pick)], np.float32)

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats:
        """Statistics of this worker's next mini-batch; zeros once its split is done."""
        x = self._next_rows()
        if x is None:
            k, d = centroids.shape
            return PartialStats.zeros(k, d)
        return partial_stats(x, CentroidIndex(centroids, self.spec.metric, self.spec.device))


@ray.remote
def _sum_stats(*parts: PartialStats) -> PartialStats:
    return reduce_stats(list(parts))


def tree_reduce(refs: list) -> PartialStats:
    """Sum statistics refs, REDUCE_FAN_IN at a time, in a fixed (index) order."""
    while len(refs) > REDUCE_FAN_IN:
        refs = [
            _sum_stats.remote(*refs[i : i + REDUCE_FAN_IN])
            for i in range(0, len(refs), REDUCE_FAN_IN)
        ]
    return reduce_stats(ray.get(refs))


class RayShardedData:
    """The ops dataset protocol over ShardWorker actors that hold their rows."""

    def __init__(self, plan: Plan, settings: ReadSettings, spec: WorkerSpec, workers: int):
        self.plan, self.settings, self.spec = plan, settings, spec
        self.assignment = plan.split(workers)
        if len(self.assignment) < workers:
            log.info(
                "input splits into %d pieces: using %d workers, not %d",
                len(self.assignment),
                len(self.assignment),
                workers,
            )
        self.actors = [self._start(shards) for shards in self.assignment]
        self.infos = self._wait_ready()

    def _wait_ready(self) -> list[dict]:
        """Worker infos, or a clear error instead of waiting forever for resources."""
        refs = [a.info.remote() for a in self.actors]
        try:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.spec.startup_timeout)
            if pending:
                have = ray.available_resources()
                raise ResourceError(
                    f"{len(pending)} of {len(refs)} workers did not start within "
                    f"{self.spec.startup_timeout:g} s; each needs {self.spec.num_cpus:g} CPU "
                    f"and {self.spec.num_gpus:g} GPU, the cluster has "
                    f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU free "
                    "(lower --workers, or let the autoscaler add nodes)"
                )
            return ray.get(refs)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, shards: list[Shard], stream=None):
        actor = ray.remote(ShardWorker).options(
            num_cpus=self.spec.num_cpus,
            num_gpus=self.spec.num_gpus,
            max_restarts=self.spec.max_restarts,
            max_task_retries=self.spec.max_restarts,
            scheduling_strategy="SPREAD",
        )
        return actor.remote(shards, self.settings, self.spec, stream)

    @property
    def skipped(self) -> Counter:
        return sum((Counter(i["skipped"]) for i in self.infos), Counter())

    def count(self) -> int:
        return sum(i["rows"] for i in self.infos)

    def dim(self) -> int:
        return self.plan.dim

    def sample(self, n: int, seed: int) -> np.ndarray:
        wanted = sample_indices(self.plan.total_rows, n, seed)
        refs = []
        for actor, shards in zip(self.actors, self.assignment, strict=True):
            mine = wanted[_in_shards(wanted, shards)]
            if len(mine):
                refs.append(actor.rows_at.remote(mine))
        return _in_row_order(ray.get(refs), self.plan.dim)

    def partial_stats(self, centroids: np.ndarray) -> PartialStats:
        ref = ray.put(np.ascontiguousarray(centroids, np.float32))
        return tree_reduce([a.partial_stats.remote(ref) for a in self.actors])

    def cluster_samples(
        self, centroids: np.ndarray, per_cluster: int, strategy: str, seed: int
    ) -> np.ndarray:
        """Up to per_cluster rows of every cluster, over all workers: each proposes its own
        candidates, the driver keeps the closest (or a random choice) per cluster."""
        ref = ray.put(np.ascontiguousarray(centroids, np.float32))
        parts = ray.get(
            [a.cluster_samples.remote(ref, per_cluster, strategy, seed) for a in self.actors]
        )
        labels = np.concatenate([p[0] for p in parts])
        d2 = np.concatenate([p[1] for p in parts])
        rows = cluster_samples(
            labels, d2, len(centroids), per_cluster, strategy, np.random.default_rng(seed)
        )
        return np.concatenate([p[2] for p in parts])[rows]

    def shutdown(self) -> None:
        """Kill the actors and wait (briefly) until Ray has their CPUs back, so the
        label pass that follows does not start on a cluster that looks full."""
        if not self.actors:
            return
        freed = min(  # actors that never started hold nothing: cap at the cluster's CPUs
            ray.cluster_resources().get("CPU", 0),
            ray.available_resources().get("CPU", 0) + self.spec.num_cpus * len(self.actors),
        )
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        deadline = time.monotonic() + 10
        while ray.available_resources().get("CPU", 0) < freed and time.monotonic() < deadline:
            time.sleep(0.05)


class SinkhornShards:
    """``ops.sinkhorn.RowShards`` over the actors: the row work stays on the workers and
    only k-vectors travel (beta and v out, column sums back), summed in worker order."""

    def __init__(self, data: RayShardedData, centroids: np.ndarray, cache_bytes: float):
        self.actors = data.actors
        self.problem = {
            "centroids": np.ascontiguousarray(centroids, np.float32),
            "rows": data.count(),
            "cache_bytes": cache_bytes,
        }
        self.problem_ref = ray.put(self.problem)  # once; each step sends only k numbers
        self.stage: tuple = (0, np.zeros(len(centroids)), 1.0)
        self.cached: list[bool] = []

    def score_moments(self) -> np.ndarray:
        problem = self.problem_ref
        parts = ray.get([a.sinkhorn_moments.remote(problem) for a in self.actors])
        self.cached = [cached for _, cached in parts]
        return np.sum([m for m, _ in parts], axis=0)

    def prepare(self, beta: np.ndarray, eps: float) -> None:
        self.stage = (self.stage[0] + 1, np.array(beta, np.float64), float(eps))

    def column_sums(self, v: np.ndarray) -> np.ndarray:
        problem = self.problem_ref
        parts = ray.get(
            [a.sinkhorn_column_sums.remote(v, problem, self.stage) for a in self.actors]
        )
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        return total

    def release(self) -> None:
        ray.get([a.sinkhorn_release.remote() for a in self.actors])


class RayStreamingData(RayShardedData):
    """Mini-batch k-means over a Ray Data stream split across the actors.

    Ray Data reads the shards; each actor pulls its own split, so batches reach the
    actors by reference and never pass through the driver.
    """

    def __init__(
        self, plan: Plan, settings: ReadSettings, spec: WorkerSpec, workers: int, seed: int
    ):
        from pipelines.datasource import embedding_dataset

        self.plan, self.settings, self.spec = plan, settings, spec
        self.assignment = []
        # Small read tasks in a seeded random order: batches mix many files early on.
        dataset = embedding_dataset(
            plan, settings, with_ids=False, shuffle_seed=seed, rows_per_task=4 * spec.batch_rows
        )
        self.splits = dataset.streaming_split(workers, equal=True)
        self.actors = [self._start([], stream=split) for split in self.splits]
        self.infos = []  # rows are validated (and skipped) by the stream's read tasks

    def count(self) -> int:
        return self.plan.total_rows

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Seeding sample from the first batches of the (block-shuffled) stream.

        Unlike the in-memory workers' sample this depends on the worker count, as every
        mini-batch result does; a uniform sample would cost a full read of the input.
        """
        per_worker = -(-n // len(self.actors))
        parts = ray.get([a.stream_sample.remote(per_worker, seed) for a in self.actors])
        return np.concatenate(parts)[:n]

    def start_epoch(self, epoch: int) -> None:
        ray.get([a.start_epoch.remote(epoch) for a in self.actors])

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        ref = ray.put(np.ascontiguousarray(centroids, np.float32))
        stats = tree_reduce([a.next_batch_stats.remote(ref) for a in self.actors])
        return stats if stats.n else None


def _in_shards(rows: np.ndarray, shards: list[Shard]) -> np.ndarray:
    mask = np.zeros(len(rows), bool)
    for s in shards:
        lo = s.file.offset + s.start
        mask |= (rows >= lo) & (rows < lo + s.rows)
    return mask


def _in_row_order(parts: list[tuple[np.ndarray, np.ndarray]], dim: int) -> np.ndarray:
    if not parts:
        return np.empty((0, dim), np.float32)
    rows = np.concatenate([p[0] for p in parts])
    x = np.concatenate([p[1] for p in parts])
    return x[np.argsort(rows, kind="stable")]
