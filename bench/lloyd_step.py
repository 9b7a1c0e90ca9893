"""The Lloyd step alone, in one process: ``ops.kmeans.fit`` on an in-memory matrix
against ``faiss.Kmeans`` from the same centroids, on the same threads, subsampling off;
and our loop with every row searched in every step (``ops.stats.partial_stats``, the
step without ``ops.bounds``), also from the same centroids.

    python -m bench.lloyd_step [--rows 1000000] [--dim 128] [--k 1024] [--iterations 20]

Reported: each loop's seconds per iteration (faiss's from its ``iteration_stats``), the
share of rows each of our steps searched, the whole loops' time ratios, the ratio of the
medians of the last --late iterations, and whether our labels equal an exact search's
(faiss ``IndexFlatL2`` on the same centroids, outside the clock) in every iteration:
rows that differ, and how close their two nearest centroids are. torch, which adds the
sums, is loaded before the clock, as a worker loads it at start-up.
"""

from __future__ import annotations

import faiss
import numpy as np

from bench.common import save, size_parser
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import KMeansParams, KMeansState, fit
from pseudolabel.ops.stats import partial_stats
from tests.data import mixture


class PlainData(ArrayData):
    """Every row searched in every step."""

    def partial_stats(self, centroids, near=None):
        return partial_stats(self.x, CentroidIndex(centroids), labels=self.labels)


def main() -> None:
    import torch  # noqa: F401

    p = size_parser(rows=1_000_000, dim=128, k=1024)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--late", type=int, default=8, help="last iterations in the medians")
    args = p.parse_args()
    x, _ = mixture(args.rows, args.dim, 2000, seed=0, spread=0.35)
    start = x[np.random.default_rng(1).choice(len(x), args.k, replace=False)].copy()
    results: dict = {"rows": args.rows, "dim": args.dim, "k": args.k,
                     "iterations": args.iterations,
                     "threads": faiss.omp_get_max_threads()}  # fmt: skip

    km = faiss.Kmeans(args.dim, args.k, niter=args.iterations, seed=1,
                      max_points_per_centroid=args.rows)  # fmt: skip
    km.train(x, init_centroids=start)
    faiss_s = list(np.diff([0.0, *[s["time"] for s in km.iteration_stats]]))
    results["faiss"] = {"iteration_seconds": [round(t, 3) for t in faiss_s],
                        "final_objective": float(km.iteration_stats[-1]["obj"])}  # fmt: skip

    params = KMeansParams(args.k, iterations=args.iterations, tol=0, seed=1, search="flat")
    plain = fit(PlainData(x), params, KMeansState(start.copy()))
    plain_s = [r.seconds for r in plain.history]
    results["plain"] = {"iteration_seconds": [round(t, 3) for t in plain_s],
                        "final_objective": plain.history[-1].inertia}  # fmt: skip

    data = ArrayData(x)
    steps, searched, before = [], [], [start.copy()]

    def record(state, _):
        searched.append(round(data.bounds.searched / len(x), 4))
        steps.append((data.labels.copy(), before[-1]))
        before.append(state.centroids.copy())

    ours = fit(data, params, KMeansState(start.copy()), record)
    ours_s = [r.seconds for r in ours.history]
    differ, gaps = [], []
    index = faiss.IndexFlatL2(args.dim)
    for labels, centroids in steps:  # outside the clock
        index.reset()
        index.add(centroids)
        D, I = index.search(x, 2)
        wrong = np.flatnonzero(I[:, 0] != labels)
        differ.append(int(wrong.size))
        gaps.extend((D[wrong, 1] - D[wrong, 0]) / np.maximum(D[wrong, 0], 1e-30))
    results["ours"] = {"iteration_seconds": [round(t, 3) for t in ours_s],
                       "share_of_rows_searched": searched,
                       "rows_not_as_exact_search": differ,
                       "their_largest_relative_gap": float(max(gaps, default=0.0)),
                       "final_objective": ours.history[-1].inertia}  # fmt: skip
    late = slice(-args.late, None)
    results["whole_loop_ratio_to_plain"] = round(sum(ours_s) / sum(plain_s), 4)
    # faiss may stop before --iterations (its iteration_stats say how many it ran).
    common = min(len(faiss_s), len(ours_s))
    results["faiss_iterations_run"] = len(faiss_s)
    results["ratio_to_faiss_over_common_iterations"] = round(
        sum(ours_s[:common]) / sum(faiss_s[:common]), 4
    )
    results["late_median_ratio_to_faiss"] = round(
        float(np.median(ours_s[:common][late]) / np.median(faiss_s[:common][late])), 4
    )
    results["late_median_ratio_to_plain"] = round(
        float(np.median(ours_s[late]) / np.median(plain_s[late])), 4
    )
    results["objective_ratio_to_faiss"] = round(
        ours.history[-1].inertia / results["faiss"]["final_objective"], 6
    )
    results["objective_ratio_to_plain"] = round(
        ours.history[-1].inertia / plain.history[-1].inertia, 9
    )
    print({k: v for k, v in results.items() if k not in ("faiss", "ours", "plain")})
    for name in ("faiss", "plain", "ours"):
        print(name, results[name]["iteration_seconds"])
    print("searched", searched, "differ", differ)
    print(save("lloyd_step", results))


if __name__ == "__main__":
    main()
