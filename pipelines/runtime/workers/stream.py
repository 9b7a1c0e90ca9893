"""The streaming role: mini-batch k-means over a Ray Data split, pulled by the actor.

Ray Data reads (and validates) the rows; each actor pulls its own split of the stream,
so batches reach it by reference and never pass through the driver. Seeding takes its
sample from the first batches of epoch 0, which are kept for the first steps.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import ray

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.dataset import EpochLost
from pseudolabel.ops.gpu import usable_device
from pseudolabel.ops.stats import PartialStats, partial_stats
from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.session import limit_threads


class StreamWorker:
    """One split of a Ray Data stream (``Dataset.streaming_split``), in mini-batches."""

    def __init__(self, split, column: str, dim: int, spec: WorkerSpec):
        limit_threads(spec.threads)
        import torch  # noqa: F401  (its index_add_ sums every batch: ops.stats)

        self.stream, self.column, self.dim = split, column, dim
        self.spec = dataclasses.replace(spec, device=usable_device(spec.device))
        self._batches = None
        self._pending: list[np.ndarray] = []  # batches read for seeding, not yet used
        # (epoch, attempt) being pulled; None in a fresh actor, including one Ray
        # rebuilt after a crash, whose predecessor's place in the stream is gone.
        self._epoch: tuple[int, int] | None = None

    def info(self) -> dict:
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"rows": 0, "node": node, "pid": os.getpid(), "device": self.spec.device}

    def start_epoch(self, epoch: int, attempt: int = 0) -> None:
        """Begin pulling this worker's split for ``epoch`` (a no-op if this attempt at
        it has begun: seeding begins epoch 0 and keeps its batches for the loop)."""
        if self._epoch == (epoch, attempt):
            return
        self._epoch = (epoch, attempt)
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
        x = np.asarray(batch[self.column])
        if x.dtype == object:  # a list column arrives as an array of arrays
            x = np.stack(x)
        self._check(x)
        return normalize_rows(x) if self.spec.metric == "ip" else x

    def _check(self, x: np.ndarray) -> None:
        """Rows from a user's Dataset reach here unvalidated (a plan's read tasks have
        already refused or skipped bad rows, and pass this check)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"ray dataset: column {self.column!r} has rows of shape "
                             f"{x.shape[1:]}, expected ({self.dim},)")  # fmt: skip
        if not np.isfinite(x.sum(axis=1, dtype=np.float64)).all():
            raise InputError(f"ray dataset: NaN or inf in column {self.column!r}")
        if self.spec.metric == "ip" and not np.any(x != 0, axis=1).all():
            raise InputError(
                f"ray dataset: an all-zero row in column {self.column!r} cannot be "
                "unit-normalised for spherical k-means"
            )

    def stream_sample(self, n: int, seed: int) -> np.ndarray:
        """A uniform sample of n rows from the first batches of epoch 0, which are kept
        for the first steps: seeding reads nothing extra and skips no row."""
        self.start_epoch(0, 0)
        held, rows = [], 0
        while rows < n and (x := self._next_rows()) is not None:
            held.append(x)
            rows += len(x)
        self._pending = held
        if not held:
            return np.empty((0, self.dim), np.float32)
        pool = np.concatenate(held)
        pick = np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False)
        return np.asarray(pool[np.sort(pick)], np.float32)

    def next_batch_stats(self, centroids: np.ndarray, epoch: tuple[int, int]) -> PartialStats:
        """Statistics of this worker's next mini-batch of ``epoch`` (epoch, attempt);
        zeros once its split is done. A rebuilt actor cannot continue its predecessor's
        split: ``EpochLost`` tells the driver to start the epoch again."""
        if self._epoch != tuple(epoch):
            raise EpochLost(f"stream worker rebuilt during epoch {epoch[0] + 1}")
        x = self._next_rows()
        if x is None:
            k, d = centroids.shape
            return PartialStats.zeros(k, d)
        return partial_stats(x, CentroidIndex(centroids, self.spec.metric, self.spec.device))
