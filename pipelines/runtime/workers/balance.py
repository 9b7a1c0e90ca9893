"""The balance role: the row side of the balanced labels.

Sinkhorn runs on a uniform sample of the worker's rows (``ops.sinkhorn.RowBlock``), the
size corrections on all of them (``ops.hard_balance.boundary``). The sample is the rows
whose sampling key (``ops.sampling.row_keys``, from the global row number) is below the
problem's fraction, so it is the same for any number of workers. Every call carries
what it needs (the problem: centroids, fraction, seed, sample size, cache budget; the
stage: a token, beta, eps), so an actor that Ray restarted, which has lost its block,
rebuilds it and answers.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.ops.hard_balance import Boundary, BoundaryBlock
from pseudolabel.ops.sampling import row_keys
from pseudolabel.ops.sinkhorn import RowBlock


class BalanceRole:
    """Needs ``self.x``, ``self.rows`` and ``self.spec`` (the resident-rows role)."""

    _row_block: RowBlock | None = None
    _stage: int | None = None
    _boundary_block: tuple[str, BoundaryBlock] | None = None

    def _sample_rows(self, problem: dict) -> np.ndarray:
        if problem["fraction"] >= 1.0:
            return self.x
        return self.x[row_keys(self.rows, problem["seed"]) < problem["fraction"]]

    def balance_sample_size(self, problem: dict) -> int:
        return len(self._sample_rows(problem))

    def balance_sample(self, problem: dict) -> np.ndarray:
        """This worker's share of Sinkhorn's sample, for a solve on the driver."""
        return self._sample_rows(problem)

    def _block(self, problem: dict, stage: tuple | None) -> RowBlock:
        block = self._row_block
        if block is None:
            x, c = self._sample_rows(problem), problem["centroids"]
            cache = 2 * len(x) * len(c) * 4 <= problem["cache_bytes"]
            block = RowBlock(x, c, self.spec.metric, problem["rows"], cache=cache)
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
        self._row_block = self._boundary_block = None

    def balance_boundary(
        self, problem: dict, g: np.ndarray, width: float, fresh: bool = False
    ) -> Boundary:
        """Over all of this worker's rows, not the sample. The block keeps its rows'
        candidates between passes of one problem (``ops.hard_balance.BoundaryBlock``)."""
        kept = self._boundary_block
        if kept is None or kept[0] != problem["token"]:
            block = BoundaryBlock(self.x, problem["centroids"], self.spec.metric)
            self._boundary_block = kept = (problem["token"], block)
        return kept[1].boundary(g, width, fresh)
