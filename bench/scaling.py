"""Scaling on one machine, and the driver's share of an iteration.

    python -m bench.scaling [--rows 500000] [--dim 128]

1. Lloyd fit (k = 1024, 5 iterations, random seeding) with 1, 2 and 4 workers on the
   same data (4 workers share 2 cores at 0.5 CPU each).
2. Per iteration, the time the driver itself spends (summing the workers' statistics
   and updating the centroids) against the whole iteration, for k = 1024 and k = 65536
   at d = 128: the driver holds k x d float64 sums from every worker.
The numbers feed docs/scaling.md, whose formulas are checked against them.
"""

from __future__ import annotations

import os
import time

import pseudolabel.ops.kmeans as kmeans_module
import pseudolabel.pipelines.runtime.shards as shards_module
from bench.common import dataset, save, size_parser, start_ray, timer
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards


class DriverClock:
    """Accumulates the time spent in the driver's reduce and update functions."""

    def __init__(self):
        self.seconds = 0.0
        self._reduce = shards_module.reduce_stats
        self._update = kmeans_module.lloyd_update

    def __enter__(self):
        def timed(f):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return f(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t0

            return wrapper

        shards_module.reduce_stats = timed(self._reduce)
        kmeans_module.lloyd_update = timed(self._update)
        return self

    def __exit__(self, *exc):
        shards_module.reduce_stats = self._reduce
        kmeans_module.lloyd_update = self._update


def fit_once(root, k, iterations, workers, cpus):
    plan = make_plan(str(root), ReadSettings())
    data = ResidentShards.from_plan(
        plan, ReadSettings(dim=plan.dim), WorkerSpec("l2", num_cpus=cpus), workers
    )
    try:
        params = KMeansParams(k=k, iterations=iterations, tol=0, seed=0, init="random")
        state, _ = init_state(data, params)
        with DriverClock() as clock:
            t0 = time.perf_counter()
            fit(data, params, state)
            loop = time.perf_counter() - t0
        return loop, clock.seconds
    finally:
        data.shutdown()


def main() -> None:
    p = size_parser(rows=500_000, dim=128, k=None)
    a = p.parse_args()
    root, _ = dataset(a.rows, a.dim, tag="-scaling")
    r: dict = {"rows": a.rows, "dim": a.dim, "cores": os.cpu_count()}
    r["ray_start"] = start_ray(os.cpu_count())
    for workers, cpus in ((1, 1.0), (2, 1.0), (4, 0.5)):
        with timer(r, f"fit_{workers}_workers_total"):
            loop, driver = fit_once(root, 1024, 5, workers, cpus)
        r[f"fit_{workers}_workers_loop"] = loop
        print(f"k=1024, {workers} worker(s): 5 iterations in {loop:.2f} s", flush=True)
    for k, iterations, rows in ((1024, 5, a.rows), (65536, 2, 131_072)):
        root_k, _ = dataset(rows, a.dim, tag="-scaling") if rows != a.rows else (root, None)
        loop, driver = fit_once(root_k, k, iterations, 2, 1.0)
        r[f"k{k}_iteration"] = loop / iterations
        r[f"k{k}_driver_per_iteration"] = driver / iterations
        r[f"k{k}_driver_share"] = driver / loop
        print(
            f"k={k}, {rows} rows, 2 workers: {loop / iterations:.2f} s per iteration, "
            f"driver {driver / iterations * 1000:.1f} ms ({100 * driver / loop:.2f}%)",
            flush=True,
        )
    print(f"  results: {save('scaling', r)}")


if __name__ == "__main__":
    main()
