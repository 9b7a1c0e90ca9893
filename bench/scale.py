"""Scale benchmarks (issue: a billion rows, a million centres), in one process, ratios.

    python -m bench.scale search [--rows 600000] [--dim 32] [--k 65536] [--iterations 5]

``search``: Lloyd with ``--search flat`` against ``--search approx`` (``ops.neighbours``)
from the same seeding, on the same rows, through the one loop (``ops.kmeans.fit`` on
``ArrayData``, as each worker runs it on its rows). Reported: the time of each iteration
after the first (approx's first is exact by design), the final objectives, and the label
pass's search for new rows (no previous label) against flat: time and distances.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import save
from pseudolabel.ops.balanced import BalancedAssigner
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["search"])
    p.add_argument("--rows", type=int, default=600_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--components", type=int, default=4096)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--label-rows", type=int, default=100_000)
    args = p.parse_args()
    results = search(args)
    print({k: v for k, v in results.items() if k not in ("flat", "approx")})
    print(save(f"scale-{args.what}", results))


if __name__ == "__main__":
    main()
