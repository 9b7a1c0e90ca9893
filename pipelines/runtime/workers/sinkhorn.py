"""The Sinkhorn role: the row side of the balanced assignment (``ops.sinkhorn.RowBlock``).

Every call carries what the block needs (the problem: centroids, row count, cache
budget; the stage: a token, beta, eps), so an actor that Ray restarted, which has lost
its block, rebuilds it and answers.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.ops.sinkhorn import RowBlock


class SinkhornRole:
    """Needs ``self.x`` and ``self.spec`` (the resident-rows role)."""

    _row_block: RowBlock | None = None
    _stage: int | None = None

    def _block(self, problem: dict, stage: tuple | None) -> RowBlock:
        block = self._row_block
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
