"""Scaling on one machine, and the driver's share of an iteration.

    python -m bench.scaling [--rows 500000] [--dim 128] [--large-k 65536] [--large-k-rows 131072]

1. Lloyd fit (k = 1024, 5 iterations, random seeding) with 1, 2 and 4 workers on the
   same data (4 workers share 2 cores at 0.5 CPU each).
2. Per iteration, the driver's part against the whole iteration, for k = 1024 and
   k = --large-k at d = 128: the clock runs from the moment every worker's statistics
   are ready (the wait in ``pipelines.runtime.shards.tree_reduce`` returns) to the end
   of the centroid update, so it covers the transfer of the k x d float64 sums to the
   driver (``ray.get``; on one machine a read from the node's shared-memory object
   store, no network), their sum and ``lloyd_update``. The workers' compute and the
   wait for the slowest worker are outside it.
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
    """Adds up, over a fit, the seconds from "every worker's statistics are ready"
    (``wait_all`` in ``tree_reduce`` returns) to "the centroids are updated"
    (``lloyd_update`` returns): transfer to the driver, sum, update. Hooks the two
    functions by wrapping them in their modules, for the benchmark only."""

    def __init__(self):
        self.seconds = 0.0
        self._ready: float | None = None
        self._wait = shards_module.wait_all
        self._update = kmeans_module.lloyd_update

    def __enter__(self):
        def wait_all(*a, **kw):
            self._wait(*a, **kw)
            self._ready = time.perf_counter()  # every worker's statistics are ready

        def lloyd_update(*a, **kw):
            out = self._update(*a, **kw)
            if self._ready is None:
                raise RuntimeError("lloyd_update without a tree_reduce wait: hooks out of date")
            self.seconds += time.perf_counter() - self._ready
            self._ready = None
            return out

        shards_module.wait_all = wait_all
        kmeans_module.lloyd_update = lloyd_update
        return self

    def __exit__(self, *exc):
        shards_module.wait_all = self._wait
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
    p.add_argument("--large-k", type=int, default=65536, help="k of the driver-share run")
    p.add_argument("--large-k-rows", type=int, default=131_072, help="rows of that run")
    a = p.parse_args()
    root, _ = dataset(a.rows, a.dim, tag="-scaling")
    r: dict = {"rows": a.rows, "dim": a.dim, "cores": os.cpu_count()}
    r["driver_measures"] = "statistics ready to centroids updated: transfer, sum, update"
    r["ray_start"] = start_ray(os.cpu_count())
    for workers, cpus in ((1, 1.0), (2, 1.0), (4, 0.5)):
        with timer(r, f"fit_{workers}_workers_total"):
            loop, driver = fit_once(root, 1024, 5, workers, cpus)
        r[f"fit_{workers}_workers_loop"] = loop
        print(f"k=1024, {workers} worker(s): 5 iterations in {loop:.2f} s", flush=True)
    for k, iterations, rows in ((1024, 5, a.rows), (a.large_k, 2, a.large_k_rows)):
        root_k, _ = dataset(rows, a.dim, tag="-scaling") if rows != a.rows else (root, None)
        loop, driver = fit_once(root_k, k, iterations, 2, 1.0)
        r[f"k{k}_iteration"] = loop / iterations
        r[f"k{k}_driver_per_iteration"] = driver / iterations
        r[f"k{k}_driver_share"] = driver / loop
        print(
            f"k={k}, {rows} rows, 2 workers: {loop / iterations:.2f} s per iteration, "
            f"driver (transfer, sum, update) {driver / iterations * 1000:.1f} ms "
            f"({100 * driver / loop:.2f}%)",
            flush=True,
        )
    print(f"  results: {save('scaling', r)}")


if __name__ == "__main__":
    main()
