"""Scale benchmarks (issue: a billion rows, a million centres), in one process, ratios.

    python -m bench.scale search [--rows 600000] [--dim 32] [--k 65536] [--iterations 5]
    python -m bench.scale sample [--rows 1048576] [--dim 32] [--k 256] [--iterations 20]
                                 [--seeds 1,2,3]
    python -m bench.scale driver [--rows 4000000] [--dim 16] [--k 256] [--iterations 5]
    python -m bench.scale reduce [--rows 131072] [--dim 128] [--k 65536] [--iterations 7]
                                 [--workers 8] [--nodes 1] [--rounds 2]

``search``: Lloyd with ``--search flat`` against ``--search approx`` (``ops.neighbours``)
from the same seeding, on the same rows, through the one loop (``ops.kmeans.fit`` on
``ArrayData``, as each worker runs it on its rows). Reported: the time of each iteration
after the first (approx's first is exact by design), the final objectives, and the label
pass's search for new rows (no previous label) against flat: time and distances; the
neighbour graph's build time and the candidates a row is scored against.

``sample``: two whole ``pseudolabel run``s on the same parquet shards and embedded Ray,
one fitting every row, one ``--fit-sample auto`` (256 k rows, 1/16 of the input at the
defaults); both label every row. Once per seed in ``--seeds``: the seed draws the
seeding and the sample, and the local optimum each fit ends in. Reported per seed and
as mean and max over the seeds: the fit stage's time and its iterations' time, and the
objective over all rows (the sum of the label pass's distances), as ratios.

``driver``: the driver's peak resident memory (VmHWM from /proc) in a whole
``pseudolabel run`` at --rows and at a quarter of them, parquet with an id column (so
the duplicate-id check runs), each run in its own process with its own embedded Ray.

``reduce``: ``--workers`` resident workers on one embedded Ray fit the rows with the
search that ``auto`` picks at this k (approx): whole fits of ``--iterations`` from the
same start, reduced by a gather and a reduce-scatter in turn, ``--rounds`` of each, so
that both meet the same machine state; each keeps its centroids where its steps leave
them (the scatter's on the workers). Reported per reduction, over the iterations after
the first (exact for both): the median bytes of arrays the driver fetches and puts an
iteration (counted at ``runtime.calls.get`` and ``put``, which every value goes
through), the median time of an iteration (the loop's own: graph, step, update), and
whether every fit ended with the same centroids. With ``--nodes N`` the workers are
spread over a ``ray.cluster_utils.Cluster`` of N nodes on this machine, each with its
own object store: what crosses nodes goes through Ray's object manager, as between
machines.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import OUT, dataset, save, start_ray
from pseudolabel.ops.balanced import BalancedAssigner
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import CELL_ITERATIONS, KMeansParams, fit, init_state, neighbour_graph
from tests.data import mixture


def search(args: argparse.Namespace) -> dict:
    x, _ = mixture(args.rows, args.dim, args.components, seed=0, spread=0.35)
    results: dict = {"rows": args.rows, "dim": args.dim, "k": args.k}
    fitted = {}
    for name in ("flat", "approx"):
        data = ArrayData(x)
        params = KMeansParams(
            args.k, iterations=args.iterations, tol=0, seed=1, init="random", search=name
        )
        state, _ = init_state(data, params)
        fit(data, params, state, lambda s, r, name=name: print(name, r.line(args.iterations)))
        seconds = [r.seconds for r in state.history]
        results[name] = {
            "iteration_seconds": [round(s, 3) for s in seconds],
            "later_iteration_mean_s": round(float(np.mean(seconds[1:])), 3),
            "final_inertia": state.history[-1].inertia,
            "changed": [r.changed for r in state.history],
        }
        fitted[name] = state.centroids
    flat, approx = results["flat"], results["approx"]
    results["later_iteration_time_ratio"] = round(
        approx["later_iteration_mean_s"] / flat["later_iteration_mean_s"], 4
    )
    results["final_inertia_ratio"] = round(approx["final_inertia"] / flat["final_inertia"], 6)

    # The graph the driver builds each approx iteration, on the final centroids: its
    # time against the FLOP of its cells' k-means (2 k c d per iteration), from random
    # cells and from the same graph's, and how many candidates a row scores (a cell's
    # candidates, weighted by the centroids in it).
    t0 = time.perf_counter()
    graph = neighbour_graph(fitted["approx"], "l2", 1)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    neighbour_graph(fitted["approx"], "l2", 1, previous=graph)  # as iterations 3 on do
    warm_s = time.perf_counter() - t0
    members = np.bincount(graph.cell_of, minlength=graph.cells)
    candidates = np.diff(graph.offsets)
    results["graph"] = {
        "cells": graph.cells,
        "build_s": round(build_s, 3),
        "warm_build_s": round(warm_s, 3),
        "cell_kmeans_flop": 2 * args.k * graph.cells * args.dim * CELL_ITERATIONS,
        "members_per_cell": args.k / graph.cells,
        "candidates_per_row": round(float((members * candidates).sum() / args.k), 1),
    }

    # The label pass: rows with no previous label, against the same centroids.
    rows = x[: args.label_rows]
    labels = {}
    for name in ("flat", "approx"):
        t0 = time.perf_counter()
        out = BalancedAssigner(fitted["flat"], "l2", search=name, seed=1).assign(rows)
        labels[name] = (time.perf_counter() - t0, out)
    (t_flat, exact), (t_approx, near) = labels["flat"], labels["approx"]
    results["label_pass"] = {
        "rows": len(rows),
        "time_ratio": round(t_approx / t_flat, 4),
        "same_label": round(float((near.label == exact.label).mean()), 5),
        "distance_ratio": round(float(near.distance.sum() / exact.distance.sum()), 6),
    }
    return results


def sample(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from pseudolabel.pipelines.commands.run import run
    from pseudolabel.pipelines.config import build

    root, _ = dataset(args.rows, args.dim, args.components, shards=8)
    results: dict = {"rows": args.rows, "dim": args.dim, "k": args.k, "seeds": args.seeds,
                     "ray_start_s": start_ray()}  # fmt: skip
    for seed in args.seeds:  # a seed draws the seeding and the sample: local optima vary
        runs = {}
        for name, fit_sample in (("full", "0"), ("sampled", "auto")):
            out = OUT / f"scale-sample-{name}"
            manifest = run(
                build(input=str(root), output=str(out), k=args.k, iterations=args.iterations,
                      tol=0, seed=seed, init="random", fit_sample=fit_sample, overwrite=True)
            )  # fmt: skip
            distances = pq.read_table(out / "labels", columns=["distance"]).column("distance")
            runs[name] = {
                "fit_s": round(manifest["timings"]["fit"], 3),
                "iterations_s": round(manifest["fit"]["seconds"]["iterations"], 3),
                "sample_rows": manifest["fit"]["sample_rows"],
                "objective_all_rows": float(np.sum(distances.to_numpy(), dtype=np.float64)),
            }
        full, sampled = runs["full"], runs["sampled"]
        runs["fit_time_ratio"] = round(sampled["fit_s"] / full["fit_s"], 4)
        runs["iterations_time_ratio"] = round(sampled["iterations_s"] / full["iterations_s"], 4)
        runs["objective_ratio"] = round(
            sampled["objective_all_rows"] / full["objective_all_rows"], 6
        )
        print("seed", seed, {k: v for k, v in runs.items() if k.endswith("ratio")}, flush=True)
        results[f"seed {seed}"] = runs
    for what in ("fit_time_ratio", "iterations_time_ratio", "objective_ratio"):
        values = [results[f"seed {s}"][what] for s in args.seeds]
        results[f"mean_{what}"] = round(float(np.mean(values)), 6)
        results[f"max_{what}"] = max(values)
    return results


DRIVER_RUN = """
import json, sys
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.config import build
manifest = run(build(**json.loads(sys.argv[1])))
status = open("/proc/self/status").read()
peak = next(line for line in status.splitlines() if line.startswith("VmHWM"))
print(json.dumps({"peak_rss_kb": int(peak.split()[1]), "seconds": manifest["timings"]}))
"""


def driver(args: argparse.Namespace) -> dict:
    import json
    import subprocess
    import sys

    results: dict = {"dim": args.dim, "k": args.k}
    for rows in (args.rows // 4, args.rows):
        root, _ = dataset(rows, args.dim, args.components, shards=16)
        out = OUT / f"scale-driver-{rows}"
        settings = dict(input=str(root), output=str(out), k=args.k, iterations=args.iterations,
                        tol=0, init="random", overwrite=True)  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", DRIVER_RUN, json.dumps(settings)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results[str(rows)] = measured
        print(rows, "rows: driver peak", measured["peak_rss_kb"] // 1024, "MiB", flush=True)
    small, large = (results[str(r)]["peak_rss_kb"] for r in (args.rows // 4, args.rows))
    results["peak_rss_ratio"] = round(large / small, 4)
    return results


def _array_bytes(value) -> int:
    """Bytes of the numpy arrays in ``value`` (statistics, graphs, lists of them)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(_array_bytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(_array_bytes(v) for v in vars(value).values())
    return 0


def reduce(args: argparse.Namespace) -> dict:
    import ray

    from pseudolabel.ops.kmeans import KMeansState
    from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
    from pseudolabel.pipelines.runtime import calls, shards
    from pseudolabel.pipelines.runtime.actors import WorkerSpec

    root, x = dataset(args.rows, args.dim, args.components, shards=args.workers)
    results: dict = {"rows": args.rows, "dim": args.dim, "k": args.k, "workers": args.workers,
                     "nodes": args.nodes}  # fmt: skip
    cluster = None
    if args.nodes > 1:  # nodes with object stores of their own: transfers between them
        from ray.cluster_utils import Cluster  # go through Ray's object manager (loopback)

        node = {"num_cpus": -(-args.workers // args.nodes), "object_store_memory": 2 << 30}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        ray.init(address=cluster.address, logging_level="ERROR")
    else:
        results["ray_start_s"] = start_ray()
    plan = make_plan(str(root), ReadSettings())
    cpus = min(1.0, ray.cluster_resources()["CPU"] / args.workers)
    spec = WorkerSpec("l2", num_cpus=cpus, threads=1)
    params = KMeansParams(args.k, iterations=args.iterations, tol=0, seed=1)
    start = x[np.random.default_rng(1).choice(len(x), args.k, replace=False)]
    moved = {"received": 0, "sent": 0}  # by the driver, since the last iteration
    plain_get, plain_put = calls.get, calls.put

    def counting_get(refs, timeout=None):  # every value the driver fetches
        got = plain_get(refs, timeout)
        moved["received"] += _array_bytes(got)
        return got

    def counting_put(value):  # every value the driver puts
        moved["sent"] += _array_bytes(value)
        return plain_put(value)

    calls.get, calls.put = counting_get, counting_put
    fits: dict = {"gather": [], "scatter": []}
    try:
        data = shards.ResidentShards.from_plan(plan, ReadSettings(dim=plan.dim), spec, args.workers)
        try:
            # Whole fits from the same start, the two reductions in turn (each keeps its
            # centroids where its steps leave them), so that both meet the machine alike.
            for mode in ("gather", "scatter") * args.rounds:
                data.reduce, steps = mode, []
                moved.update(received=0, sent=0)

                def record(_, rec, steps=steps, mode=mode):
                    steps.append({"s": rec.seconds, **moved})
                    print(mode, rec.line(args.iterations), moved, flush=True)
                    moved.update(received=0, sent=0)

                state = fit(data, params, KMeansState(start.copy()), record)
                fits[mode].append({"steps": steps, "final": state.centroids,
                                   "inertia": state.history[-1].inertia})  # fmt: skip
        finally:
            data.shutdown()
    finally:
        calls.get, calls.put = plain_get, plain_put
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    for mode, runs in fits.items():
        later = [s for run in runs for s in run["steps"][1:]]  # the first is exact for both
        results[mode] = {
            "fits": len(runs),
            "step_seconds": [round(s["s"], 3) for s in later],
            "median_step_s": round(float(np.median([s["s"] for s in later])), 3),
            "driver_received_per_step": int(np.median([s["received"] for s in later])),
            "driver_sent_per_step": int(np.median([s["sent"] for s in later])),
            "final_inertia": runs[-1]["inertia"],
        }
    gather, scatter = results["gather"], results["scatter"]
    for what in ("median_step_s", "driver_received_per_step", "driver_sent_per_step"):
        results[f"{what}_ratio"] = round(scatter[what] / max(gather[what], 1), 5)
    finals = [run["final"] for runs in fits.values() for run in runs]
    results["same_centroids"] = all(np.array_equal(finals[0], f) for f in finals)
    return results


SIZES = {  # rows, dim, k, iterations, components: the measurements
    "search": (600_000, 32, 65536, 5, 4096),
    "sample": (1 << 20, 32, 256, 20, 1024),
    "driver": (4_000_000, 16, 256, 5, 256),
    "reduce": (131_072, 128, 65536, 7, 4096),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=list(SIZES))
    for flag in ("--rows", "--dim", "--k", "--iterations", "--components"):
        p.add_argument(flag, type=int, help="default: by benchmark (SIZES)")
    p.add_argument("--label-rows", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=8, help="reduce: resident workers")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[1, 2, 3],
                   help="sample: the runs' seeds, comma-separated")  # fmt: skip
    p.add_argument("--nodes", type=int, default=1, help="reduce: Ray nodes on this machine")
    p.add_argument("--rounds", type=int, default=2, help="reduce: fits of each reduction")
    args = p.parse_args()
    for name, default in zip(("rows", "dim", "k", "iterations", "components"),
                             SIZES[args.what], strict=True):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, default)
    results = {"search": search, "sample": sample, "driver": driver, "reduce": reduce}[args.what](
        args
    )
    print({k: v for k, v in results.items() if k not in ("flat", "approx", "gather", "scatter")})
    suffix = f"-{args.nodes}nodes" if args.what == "reduce" and args.nodes > 1 else ""
    print(save(f"scale-{args.what}{suffix}", results))


if __name__ == "__main__":
    main()
