"""Lloyd on Ray against faiss.Kmeans in one process: same data, threads and iterations.

    python -m bench.lloyd [--rows 1000000] [--dim 128] [--k 1024] [--iterations 10]

Both sides use all cores: faiss its OpenMP threads, pseudolabel one worker actor per
core. faiss's subsampling is disabled (max_points_per_centroid = rows). The comparison
that matters is with the same seeding (random, as faiss does); the k-means++ default is
reported too. Ray start-up is excluded; reading the parquet shards is reported apart.
"""

from __future__ import annotations

import os

import faiss

from bench.common import dataset, inertia, save, size_parser, start_ray, timer
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards


def ours(root, k, iterations, init, workers, results, tag):
    plan = make_plan(str(root), ReadSettings())
    settings = ReadSettings(dim=plan.dim)
    with timer(results, f"{tag}_load"):
        data = ResidentShards.from_plan(plan, settings, WorkerSpec("l2"), workers)
    params = KMeansParams(k=k, iterations=iterations, tol=0, seed=1, init=init)
    try:
        with timer(results, f"{tag}_fit"):
            state, _ = init_state(data, params)
            fit(data, params, state)
    finally:
        data.shutdown()
    return state.centroids


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1024)
    p.add_argument("--iterations", type=int, default=10)
    a = p.parse_args()
    cores = os.cpu_count()
    root, x = dataset(a.rows, a.dim)
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "iterations": a.iterations, "threads": cores}

    km = faiss.Kmeans(a.dim, a.k, niter=a.iterations, seed=1, max_points_per_centroid=a.rows)
    with timer(r, "faiss_fit"):
        km.train(x)
    r["faiss_inertia"] = inertia(x, km.centroids)

    r["ray_start"] = start_ray(cores)
    for init in ("random", "kmeans++"):
        c = ours(root, a.k, a.iterations, init, cores, r, f"ours_{init}")
        r[f"ours_{init}_inertia"] = inertia(x, c)
        r[f"ours_{init}_time_ratio"] = r[f"ours_{init}_fit"] / r["faiss_fit"]
        r[f"ours_{init}_time_ratio_with_load"] = (
            r[f"ours_{init}_fit"] + r[f"ours_{init}_load"]
        ) / r["faiss_fit"]
        r[f"ours_{init}_inertia_ratio"] = r[f"ours_{init}_inertia"] / r["faiss_inertia"]
    print(f"Lloyd, {a.rows} x {a.dim}, k={a.k}, {a.iterations} iterations, {cores} cores")
    print(f"  faiss.Kmeans (one process)      {r['faiss_fit']:7.2f} s")
    for init in ("random", "kmeans++"):
        t = {
            key: r[f"ours_{init}_{key}"]
            for key in ("fit", "load", "time_ratio", "time_ratio_with_load", "inertia_ratio")
        }
        print(
            f"  pseudolabel on Ray, {init:8s}    {t['fit']:7.2f} s"
            f"  (+{t['load']:.2f} s parquet load)  time x{t['time_ratio']:.3f}"
            f" (x{t['time_ratio_with_load']:.3f} with load)  inertia x{t['inertia_ratio']:.4f}"
        )
    print(f"  results: {save('lloyd', r)}")


if __name__ == "__main__":
    main()
