"""The driver's side of Sinkhorn over the resident workers (``ops.sinkhorn.RowShards``)."""

from __future__ import annotations

import numpy as np
import ray

from pseudolabel.pipelines.runtime.shards import ResidentShards


class SinkhornShards:
    """``ops.sinkhorn.RowShards`` over the actors: the row work stays on the workers and
    only k-vectors travel (beta and v out, column sums back), summed in worker order."""

    def __init__(self, data: ResidentShards, centroids: np.ndarray, cache_bytes: float):
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
