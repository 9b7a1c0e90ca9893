"""The resampling role: select up to ``per_cluster`` rows of every cluster, in place.

For the resampling refinement (``ops.hierarchical.resample_refine``). The driver sends a
problem (centroids, per_cluster, strategy, seed); every worker proposes its own best
candidates per cluster as (label, key, row) triples, never embeddings; the driver turns
them into k threshold pairs (``ops.sampling.cluster_thresholds``), and each worker keeps
the rows below them. A selection carries everything it was made from, so a worker that
Ray restarted recomputes it on first use.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.ops.dataset import cluster_keys
from pseudolabel.ops.sampling import below_thresholds, cluster_samples


class ResampleRole:
    """Needs ``self.x``, ``self.rows`` and ``self.spec`` (the resident-rows role)."""

    _selection_token: str | None = None
    _selection_rows: np.ndarray | None = None

    def _cluster_keys(self, problem: dict) -> tuple[np.ndarray, np.ndarray]:
        return cluster_keys(
            self.x,
            self.rows,
            problem["centroids"],
            self.spec.metric,
            problem["strategy"],
            problem["seed"],
            self.spec.device,
        )

    def cluster_candidates(self, problem: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, keys, global rows) of up to per_cluster rows of each cluster here."""
        labels, keys = self._cluster_keys(problem)
        k = len(problem["centroids"])
        picked = cluster_samples(labels, keys, self.rows, k, problem["per_cluster"])
        return labels[picked], keys[picked], self.rows[picked]

    def select(self, selection: dict) -> int:
        """Make ``selection`` current; the number of this worker's rows in it."""
        return len(self._selected(selection))

    def _selected(self, selection: dict | None) -> np.ndarray | None:
        if selection is None:
            return None
        if selection["token"] != self._selection_token:
            labels, keys = self._cluster_keys(selection)
            mask = below_thresholds(labels, keys, self.rows, selection["key_t"], selection["row_t"])
            self._selection_rows = np.flatnonzero(mask)
            self._selection_token = selection["token"]
        return self._selection_rows
