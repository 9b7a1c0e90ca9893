"""The driver's side of mini-batch k-means: ``ops.dataset.StreamingData`` over
StreamWorker actors, each pulling its own split of one Ray Data stream."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from pseudolabel.ops.dataset import EpochLost
from pseudolabel.ops.stats import PartialStats
from pseudolabel.pipelines.runtime.actors import (
    WorkerSpec,
    gather,
    start_actor,
    step_timeout,
    stop_actors,
    wait_ready,
)
from pseudolabel.pipelines.runtime.shards import tree_reduce
from pseudolabel.pipelines.runtime.workers import StreamWorker

log = logging.getLogger("pseudolabel")


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
        self.epoch = (0, 0)  # (epoch, attempt) the workers are pulling
        self.lost = False  # the current attempt raised EpochLost

    def _timeout(self, rows: int, k: int) -> float:
        return step_timeout(self.spec.task_timeout, rows, k, self.dim_)

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
        refs = [a.stream_sample.remote(per_worker, seed) for a in self.actors]
        parts = gather(refs, self._timeout(per_worker, 1), "a sample")
        return np.concatenate(parts)[:n]

    def partial_stats(self, centroids: np.ndarray, near=None) -> PartialStats:
        raise TypeError("a streamed dataset has no full pass: use algorithm='minibatch'")

    def start_epoch(self, epoch: int) -> None:
        """Every worker begins ``epoch``; after an ``EpochLost`` a new attempt at it, on
        all workers at once (a split's stream restarts only when every split does)."""
        attempt = self.epoch[1] + self.lost if self.epoch[0] == epoch else 0
        self.epoch, self.lost = (epoch, attempt), False
        refs = [a.start_epoch.remote(*self.epoch) for a in self.actors]
        gather(refs, self._timeout(0, 0), "the start of an epoch")

    def next_batch_stats(self, centroids: np.ndarray) -> PartialStats | None:
        ref = ray.put(np.ascontiguousarray(centroids, np.float32))
        try:
            refs = [a.next_batch_stats.remote(ref, self.epoch) for a in self.actors]
            k = len(centroids)
            stats = tree_reduce(refs, self._timeout(self.spec.batch_rows, k))
        except EpochLost as e:  # Ray's error for a worker's EpochLost is one too
            self.lost = True
            reason = str(e).strip().splitlines()[-1]
            log.warning("fit: %s; starting the epoch again", reason)
            raise EpochLost(reason) from None
        return stats if stats.n else None

    def shutdown(self) -> None:
        stop_actors(self.actors, self.spec)
        self.actors = []
