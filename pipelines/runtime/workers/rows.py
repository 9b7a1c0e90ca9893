"""The resident-rows role: a worker's rows, loaded once and kept for every iteration.

Answers the k-means loop's questions (``ops.dataset.ShardedData``) for its own rows:
statistics of an assignment step, and the keys and rows of a sample. A ``selection``
(see ``resample.py``) restricts both to a subset of the rows.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import threading
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.bounds import DriftBounds
from pseudolabel.ops.dataset import batch_stats, labelled_stats
from pseudolabel.ops.gpu import usable_device
from pseudolabel.ops.kmeans import reduce_slice
from pseudolabel.ops.neighbours import CentroidGraph
from pseudolabel.ops.sampling import epoch_batches, row_keys, smallest
from pseudolabel.ops.stats import PartialStats, partial_stats, sums_want_torch
from pseudolabel.pipelines.errors import PseudolabelError
from pseudolabel.pipelines.io.layout import npy_bytes
from pseudolabel.pipelines.io.plan import ReadSettings
from pseudolabel.pipelines.io.read import prefetched
from pseudolabel.pipelines.io.skips import report_skips
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.held import (
    SlicedCentroids,
    derive_with_all_cores,
    fetch_held,
    finished,
)
from pseudolabel.pipelines.runtime.roster import LOCAL_NODE
from pseudolabel.pipelines.runtime.session import limit_threads

log = logging.getLogger("pseudolabel")


def _sample_capacity(rows: int, fraction: float) -> int:
    """Room for a Binomial(rows, fraction) sample: its mean plus 6 standard deviations,
    exceeded with probability below 1e-9."""
    mean = rows * fraction
    return min(rows, int(mean + 6 * np.sqrt(mean * (1 - fraction)) + 16))


class ResidentRows:
    """Rows of a source (``runtime.sources``) in memory, or on the worker's GPU."""

    # ((epoch, seed, batches), positions of each mini-batch) of the epoch under way
    _epoch: tuple[tuple[int, int, int], list[np.ndarray]] | None = None

    def __init__(self, source, settings: ReadSettings, spec: WorkerSpec, ledger=None):
        limit_threads(spec.threads)
        # torch (the float64 scatter-add, ops.stats) loads in 1.6-2 s, more on a busy
        # host: a worker of many values loads it while the rows load and the driver
        # seeds; the driver waits for it (warm) before the first step, so that
        # --task-timeout bounds steps, not torch's load. A small one never loads it.
        self._imports = threading.Thread(
            target=importlib.import_module, args=("torch",), daemon=True
        )
        if spec.steps and sums_want_torch(source.size() * settings.dim):
            self._imports.start()
        # The device is picked here, where the GPU is (or is not): see usable_device.
        self.spec = dataclasses.replace(spec, device=usable_device(spec.device))
        self.settings = settings
        self.device_rows = None  # rows on the GPU, for --gpus-per-worker
        # A constructor exception reaches the driver only as "actor died": keep it and
        # raise it from info(), where it arrives as itself (file, row, column).
        self.error: Exception | None = None
        try:
            self._load(source, ledger)
        except PseudolabelError as e:
            self.error = e

    def _load(self, source, ledger) -> None:
        fraction = self.spec.sample_fraction
        size = source.size() if fraction >= 1 else _sample_capacity(source.size(), fraction)
        x = np.empty((size, self.settings.dim), self.settings.dtype)
        rows = np.empty(size, np.int64)
        filled = 0
        columns: list[pa.Table] = []  # ids and pass-through columns (label_columns)
        if self.spec.label_columns and fraction < 1:
            raise ValueError("label_columns needs every row: a sampled worker cannot label")
        for batch in prefetched(source.batches(self.settings)):
            report_skips(ledger, batch)
            calls.progressed(len(batch.x))
            if self.spec.label_columns and len(batch.x):
                columns.append(pa.table({"id": batch.ids, **batch.extra}))
            bx, brows = batch.x, batch.rows
            if fraction < 1:
                kept = row_keys(brows, self.spec.sample_seed) < fraction
                bx, brows = bx[kept], brows[kept]
            m = len(bx)
            if filled + m > len(x):  # past the sample's bound (_sample_capacity): grow
                extra = max(m, len(x) // 4)
                x = np.concatenate([x[:filled], np.empty((extra, x.shape[1]), x.dtype)])
                rows = np.concatenate([rows[:filled], np.empty(extra, rows.dtype)])
            x[filled : filled + m] = bx
            rows[filled : filled + m] = brows
            filled += m
        self.x, self.rows = x[:filled], rows[:filled]
        # Row i of ``columns`` is row i of x: the table the streaming pass's Labeler gets
        # from the same reader, less the embedding (``runtime.labelling``).
        self.columns = pa.concat_tables(columns, promote_options="permissive") if columns else None
        # Each row's label of the last full step, -1 before the first: where the approx
        # search (ops.neighbours) starts. A rebuilt worker starts without them.
        self.labels = np.full(filled, -1, np.int32)
        self.bounds = DriftBounds(self.labels)  # exact steps skip settled rows
        if self.spec.metric == "ip":  # zero rows were refused or skipped by the reader
            self.x = normalize_rows(self.x).astype(self.settings.dtype, copy=False)
        if self.spec.device == "cuda":  # rows stay on the GPU for every iteration
            from pseudolabel.ops.gpu import DeviceRows, backend

            self.device_rows = DeviceRows(self.x, "cuda")
            log.info(
                "worker: %d rows on the GPU in %s (search: %s)",
                len(self.x),
                self.device_rows.dtype,
                backend(),
            )

    def warm(self) -> bool:
        """Once every background import (torch) has loaded."""
        if self._imports.is_alive():
            self._imports.join()
        return True

    def info(self) -> dict:
        if self.error is not None:
            raise self.error
        return {
            "rows": len(self.x),
            "node": ray.get_runtime_context().get_node_id() if calls.on_ray() else LOCAL_NODE,
            "pid": os.getpid(),
            "threads": faiss.omp_get_max_threads(),
            "device": self.spec.device,
            "rows_dtype": self.device_rows.dtype if self.device_rows else str(self.x.dtype),
        }

    def _selected(self, selection: dict | None) -> np.ndarray | None:
        """Indices of the rows in ``selection``; None for all rows (see ``resample.py``)."""
        if selection is None:
            return None
        raise NotImplementedError("this worker has no resampling role")

    def sample_candidates(
        self, n: int, seed: int, selection: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(keys, global rows) of this worker's n rows with the smallest sampling keys."""
        mine = self._selected(selection)
        rows = self.rows if mine is None else self.rows[mine]
        keys = row_keys(rows, seed)
        picked = smallest(keys, rows, n)
        return keys[picked], rows[picked]

    def rows_at(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found global rows, their embeddings) for sorted global row numbers."""
        pos = np.searchsorted(self.rows, global_rows)
        pos = pos[pos < len(self.rows)]
        hit = pos[np.isin(self.rows[pos], global_rows)]
        return self.rows[hit], np.asarray(self.x[hit], np.float32)

    def partial_stats(
        self, centroids: np.ndarray | SlicedCentroids, selection: dict | None = None, near=None
    ) -> PartialStats:
        """Statistics of one step over all rows (or ``selection``'s). With ``near`` (an
        ``ops.neighbours.CentroidGraph``) rows are scored near their last labels; on a
        GPU the search stays exact. Centroids and graph may be held on the cluster
        (``runtime.held``): fetched here, from the workers that hold them."""
        centroids, near = fetch_held(centroids), fetch_held(near)
        if near is not None and near.centroids is None:  # it travelled without them
            near = near.with_centroids(centroids)
        mine = self._selected(selection)
        if mine is not None:
            index = CentroidIndex(centroids, self.spec.metric, self.spec.device)
            return partial_stats(self.x[mine], index)
        if self.device_rows is not None:
            return self.device_rows.partial_stats(centroids, self.spec.metric)
        return labelled_stats(self.x, centroids, self.spec.metric, self.labels, self.bounds, near)

    def next_batch_stats(
        self, centroids: np.ndarray, epoch: int, batch: int, seed: int, batches: int
    ) -> PartialStats:
        """Statistics of this worker's rows in mini-batch ``batch`` of ``epoch``, the
        epoch cut into ``batches`` by the rows' keys (``ops.sampling.epoch_batches``):
        every call carries what it needs, so a rebuilt worker answers alike."""
        if self._epoch is None or self._epoch[0] != (epoch, seed, batches):
            self._epoch = ((epoch, seed, batches), epoch_batches(self.rows, seed, epoch, batches))
        positions = self._epoch[1][batch]
        if batch == batches - 1:
            self._epoch = None  # 8 bytes a row: not held through the balance and labels
        # On CPUs: mini-batch over resident rows runs in this process only (on Ray, and
        # so on GPUs, the rows stream: ``runtime.streaming``).
        return batch_stats(self.x, positions, centroids, self.spec.metric, self.spec.device)

    def split_stats(
        self, centroids: np.ndarray | SlicedCentroids, bounds: list[tuple[int, int]], near=None
    ) -> tuple[PartialStats, ...] | PartialStats:
        """``partial_stats`` as one part per slice of the centroids, for a reduce-scatter
        (``runtime.shards.scatter_reduce`` calls it with num_returns = len(bounds))."""
        parts = self.partial_stats(centroids, None, near).split(bounds)
        return tuple(parts) if len(parts) > 1 else parts[0]

    def derive(self, fn, centroids: SlicedCentroids, *args) -> Any:
        """``fn(centroids, *args)`` for centroids and values held on the cluster
        (``runtime.held``): the approximate search's graph, built between steps."""
        value = derive_with_all_cores(fn, fetch_held(centroids), *(fetch_held(a) for a in args))
        # A graph travels to the workers without the centroids they fetch anyway.
        return value.without_centroids() if isinstance(value, CentroidGraph) else value

    def write_slice(self, location, fns: tuple, rows: np.ndarray) -> int:
        """A slice of held centroids, ``fns`` applied, to ``location`` (a checkpoint)."""
        location.write_bytes(npy_bytes(np.ascontiguousarray(finished(rows, fns), np.float32)))
        return len(rows)

    def reduce_slice(
        self, centroids: np.ndarray | SlicedCentroids, lo: int, hi: int, *parts: PartialStats
    ) -> tuple[np.ndarray, PartialStats]:
        """This worker's slice [lo, hi) of a reduce-scatter: every worker's statistics of
        it (Ray fetched them here), summed and divided (``ops.kmeans.reduce_slice``):
        (the slice's means, which stay here, and its counts and scalars). The step's
        centroids are needed for the empty clusters' rows only: of held ones, this
        worker fetches its own slice."""
        if isinstance(centroids, SlicedCentroids):
            previous = centroids.fetch_range(lo, hi)
        else:
            previous = centroids[lo:hi]
        return reduce_slice(previous, list(parts))
