"""The driver's side of the balanced labels over the resident workers: Sinkhorn on their
uniform sample (``ops.sinkhorn.RowShards``) and the size corrections on all their rows
(``ops.hard_balance.BoundaryShards``). Only k-vectors travel each step (beta and v out,
column sums, counts and gaps back) and the boundary pairs, summed in worker order."""

from __future__ import annotations

import uuid

import numpy as np

from pseudolabel.ops.hard_balance import Boundary
from pseudolabel.ops.sinkhorn import RowBlock
from pseudolabel.pipelines.runtime import calls
from pseudolabel.pipelines.runtime.actors import gather
from pseudolabel.pipelines.runtime.shards import ResidentShards


class BalanceShards:
    """Both protocols over the actors of ``data``; ``fraction`` of the rows (by sampling
    key, under ``seed``) make Sinkhorn's sample, all of them the corrections'."""

    def __init__(
        self,
        data: ResidentShards,
        centroids: np.ndarray,
        cache_bytes: float,
        fraction: float = 1.0,
        seed: int = 0,
    ):
        self.actors = data.actors
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.timeout = data.timeout(len(centroids))  # each step scores rows x k once
        self.rows = data.count()
        problem = {
            "centroids": self.centroids,
            "cache_bytes": cache_bytes,
            "fraction": float(fraction),
            "seed": seed,
            "token": uuid.uuid4().hex,  # workers keep per-problem state under it
        }
        ref = calls.put(problem)
        self.sample_rows = sum(
            self._gather([a.balance_sample_size.remote(ref) for a in self.actors])
        )
        self.problem_ref = calls.put({**problem, "rows": self.sample_rows})  # once
        self.stage: tuple = (0, np.zeros(len(centroids)), 1.0)
        self.cached: list[bool] = []

    def _gather(self, refs: list) -> list:
        return gather(refs, self.timeout, "a balancing step")

    def sample_block(self, metric: str) -> RowBlock:
        """Sinkhorn's whole sample as one in-process ``ops.sinkhorn.RowBlock``, its scores
        cached: the workers' sampled rows, in worker order, fetched once."""
        parts = self._gather([a.balance_sample.remote(self.problem_ref) for a in self.actors])
        return RowBlock(np.concatenate(parts), self.centroids, metric, self.sample_rows)

    def score_moments(self) -> np.ndarray:
        problem = self.problem_ref
        parts = self._gather([a.sinkhorn_moments.remote(problem) for a in self.actors])
        self.cached = [cached for _, cached in parts]
        return np.sum([m for m, _ in parts], axis=0)

    def prepare(self, beta: np.ndarray, eps: float) -> None:
        self.stage = (self.stage[0] + 1, np.array(beta, np.float64), float(eps))

    def column_sums(self, v: np.ndarray) -> np.ndarray:
        problem = self.problem_ref
        parts = self._gather(
            [a.sinkhorn_column_sums.remote(v, problem, self.stage) for a in self.actors]
        )
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        return total

    def boundary(self, g: np.ndarray, width: float, fresh: bool = False) -> Boundary:
        problem = self.problem_ref
        return Boundary.merge(
            self._gather([a.balance_boundary.remote(problem, g, width, fresh) for a in self.actors])
        )

    def release(self) -> None:
        self._gather([a.sinkhorn_release.remote() for a in self.actors])
