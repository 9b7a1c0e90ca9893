"""The label role: a resident worker labels the rows it holds and writes them to staging.

After a Lloyd fit (or a mini-batch fit in process) every row is already in a worker's
memory (with its id and pass-through columns when the spec asks for them,
``WorkerSpec.label_columns``): labelling there saves the streaming pass's second read of
the input. Rows and columns come from the same reader as the streaming pass's, and
``runtime.labelling`` labels both, so the files hold the same rows and columns; the
driver verifies them the same way before publishing.

The driver asks for one file of at most FILE_ROWS rows per call, so its bar moves file
by file (in process, batch by batch: ``calls.progressed``). A file is written whole
(``Location.write_bytes``: a rename on a local disk, one PUT on an object store) under a
name fixed by the worker's index and the file's rows, so a worker that Ray rebuilds and
whose call is retried writes the same file again: never half a file, never a row twice.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.ops.bounds import bounded_search
from pseudolabel.pipelines.errors import PseudolabelError
from pseudolabel.pipelines.io.storage import Location
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.labelling import ArraySource, LabelSpec, RowLabeler
from pseudolabel.pipelines.runtime.roster import join_roster

log = logging.getLogger("pseudolabel")

# Rows per written file: ~16 MiB of id, label and distance (as a read task's blocks are
# for the streaming pass: files big enough for an object store, small enough to retry).
FILE_ROWS = 1 << 20


class LabelRole:
    """Needs ``self.x``, ``self.columns`` and ``self.spec`` (the resident-rows role)."""

    _labeler: tuple[tuple | None, RowLabeler] | None = None
    # (the labeller, every held row's nearest label and squared distance, or None)
    _nearest: tuple[RowLabeler, tuple[np.ndarray, np.ndarray] | None] | None = None

    def write_labels(
        self,
        centroids: ArraySource,
        spec: LabelSpec,
        storage_options: dict,
        target: Location,
        rows: tuple[int, int, int],
        batch_rows: int,
        roster=None,
    ) -> int:
        """Label rows [start, stop) held here into the parquet file ``target``, in
        batches of ``batch_rows``; returns the rows written. ``rows``: (start, stop, the
        rows this worker held when the driver planned the files), so that a rebuilt
        worker that loaded other rows (its input changed) fails instead of shifting."""
        start, stop, held = rows
        if len(self.x) != held:
            raise PseudolabelError(
                f"a rebuilt worker loaded {len(self.x)} rows where it held {held}: its "
                "input changed during the run; rerun to plan it again"
            )
        if self.columns is None and stop > start:
            raise PseudolabelError(
                "this worker holds no ids: it was started without WorkerSpec.label_columns"
            )
        labeler = self._labeler_for(centroids, spec, storage_options, roster)
        nearest = self._nearest_for(labeler)
        # Spherical rows were unit-normalised at load; the labeller normalises them again,
        # as it does the streaming pass's raw rows (a no-op up to rounding).
        sink, writer = pa.BufferOutputStream(), None
        for lo in range(start, stop, batch_rows):
            hi = min(lo + batch_rows, stop)
            known = None if nearest is None else (nearest[0][lo:hi], nearest[1][lo:hi])
            table = labeler.label(self.x[lo:hi], self.columns.slice(lo, hi - lo), known)
            writer = writer or pq.ParquetWriter(sink, table.schema)
            writer.write_table(table)
            calls.progressed(hi - lo)
        if writer is not None:
            writer.close()
            target.write_bytes(sink.getvalue().to_pybytes())
        return stop - start

    def _nearest_for(self, labeler: RowLabeler) -> tuple[np.ndarray, np.ndarray] | None:
        """Every held row's nearest label and squared distance under the labeller's
        centroids, found from the fit's last bounds (``ops.bounds.bounded_search``: the
        rows they settle are not searched; exact as a search is), once per labeller;
        None where the labels are not plain or the worker has no bounds to start from
        (a rebuilt worker, an approximate or GPU fit), or its rows are spherical float16."""
        if self._nearest is not None and self._nearest[0] is labeler:
            return self._nearest[1]
        index, bounds = labeler.exact_index, getattr(self, "bounds", None)
        # Spherical float16 rows are not unit vectors to the rounding the bounds assume.
        rows_fit = self.spec.metric == "l2" or self.x.dtype == np.float32
        found = None
        if index is not None and bounds is not None and rows_fit and bounds.usable(index.centroids):
            searched = bounds.copy()  # the fit's own bounds stay as they are
            distances = bounded_search(self.x, index, searched).astype(np.float32)
            found = (searched.labels, distances)
            log.info("labels: %d of %d rows searched, the others settled by the fit's "
                     "bounds", searched.searched, len(self.x))  # fmt: skip
        self._nearest = (labeler, found)
        return found

    def _labeler_for(self, centroids, spec, storage_options, roster) -> RowLabeler:
        """One labeller for all of a run's files (the centroids load once), reported to
        the roster once, as a labeler of the streaming pass is."""
        # Arrays (the Python API's) are not compared: a fresh labeller for each call.
        by_url = isinstance(centroids, str) and not isinstance(spec.duals, np.ndarray)
        key = (centroids, spec) if by_url else None
        if key is None or self._labeler is None or self._labeler[0] != key:
            labeler = RowLabeler(centroids, spec, storage_options)
            join_roster(roster, labeler.spec.device)
            self._labeler = (key, labeler)
        return self._labeler[1]
