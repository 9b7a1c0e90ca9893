"""The driver's side of mini-batch k-means: ``ops.dataset.StreamingData`` over
StreamWorker actors, each pulling its own split of one Ray Data stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from pseudolabel.ops.stats import PartialStats
from pseudolabel.pipelines.runtime.actors import WorkerSpec, start_actor, stop_actors, wait_ready
from pseudolabel.pipelines.runtime.shards import tree_reduce
from pseudolabel.pipelines.runtime.workers import StreamWorker


class StreamingShards:
    """A Ray Dataset split over ``workers`` actors (``Dataset.streaming_split``).

    ``rows`` is the Dataset's row count (known from the plan or the Dataset itself). A
    plan's read tasks validate and count skips; a user's Dataset is checked by the
    workers (``StreamWorker._check``), which refuse bad rows.
    """

    def __init__(
        self, dataset: Any, column: str, dim: int, rows: int, spec: WorkerSpec, workers: int
    ):
        self.spec, self.rows, self.dim_ = spec, rows, dim
        self.splits = dataset.streaming_split(workers, equal=True)
        self.actors = [start_actor(StreamWorker, spec, s, column, dim, spec) for s in self.splits]
        self.infos = wait_ready(self.actors, spec)

    def count(self) -> int:
        return self.rows

    def dim(self) -> int:
        return self.dim_

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Seeding sample from the first batches of the (block-shuffled) stream.

        Unlike the resident workers' sample this depends on the worker count, as every
        mini-batch result does; a uniform sample would cost a full read of the input.
        """
        per_worker = -(-n // len(self.actors))
        parts = ray.get([a.stream_sample.remote(per_worker, seed) for a in self.actors])
        return np.concatenate(parts)[:n]

    def partial_stats(self, centroids: np.ndarray) -> PartialStats:
        raise TypeError("a streamed dataset has no full pass: use algorithm='minibatch'")

    def start_epoch(self, epoch: int) -> None:
        ray.get([a.start_epoch.remote(epoch) for a in self.actors])

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        ref = ray.put(np.ascontiguousarray(centroids, np.float32))
        stats = tree_reduce([a.next_batch_stats.remote(ref) for a in self.actors])
        return stats if stats.n else None

    def shutdown(self) -> None:
        stop_actors(self.actors, self.spec)
        self.actors = []
