"""Balanced labels: sizes, cost against the exact optimum, and what balance costs a run.

    python -m bench.balanced [--rows 1000000] [--dim 128] [--k 1000] [--repeats 2]
                             [--sela-rows 300000] [--sela-k 3000] [--skip-runs]

1. Exactness, small: 4000 x 32, k = 20 (200 rows per cluster) of a mixture whose first
   mode holds half the rows, k-means centroids. Sinkhorn's argmax alone, then the
   corrected duals (``ops.hard_balance``), against the exact balanced optimum in the same
   run (POT's network simplex, ``ot.emd2``): max/min cluster size, cost ratio, time. And
   our Sinkhorn against a dense float64 log-domain one (scipy ``logsumexp``, the same eps
   schedule and tol 1e-5) on the same problem: time and log-duals.
2. Price, at scale: the whole ``pseudolabel run`` (Ray start to _SUCCESS, 10 Lloyd
   iterations) on rows x dim, k, plain and with --balanced --balance-sample 64,
   alternating, ``--repeats`` times each: the ratio of the summed wall times, and the
   balanced sizes.
3. SeLa's setting scaled to this machine (SeLa: k = 3000 on ImageNet's 1.28M rows):
   k = 3000 over 300k rows (100 per cluster), plain and --balanced, once each.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import ot
from scipy.special import logsumexp

from bench.common import OUT, dataset, save, size_parser
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.hard_balance import BoundaryBlock, balanced_duals, integer_targets
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.ops.metrics import size_stats
from pseudolabel.ops.sinkhorn import RowBlock, epsilon_schedule, proportions, scores, sinkhorn
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.config import build
from tests.data import mixture


def dense_log_sinkhorn(S: np.ndarray, q: np.ndarray, epsilon: float, tol: float) -> np.ndarray:
    """The reference: plain log-domain Sinkhorn, float64, dense, eps-scaled like ours.
    Returns the log-duals at the final eps."""
    n = len(S)
    beta = np.zeros(len(q))
    for eps in epsilon_schedule(S.std(), epsilon * S.std()):
        Z, g = S.astype(np.float64) / eps, beta / eps
        while True:
            f = -np.log(n) - logsumexp(Z + g, axis=1)
            lse = logsumexp(Z + f[:, None], axis=0)
            if np.abs(np.exp(lse + g) - q).sum() < tol:
                break
            g = np.log(q) - lse
        beta = g * eps
    return g


def reference(r: dict, x: np.ndarray, c: np.ndarray) -> None:
    q = proportions(len(c))
    t0 = time.perf_counter()
    ours = sinkhorn(RowBlock(x, c, "l2", len(x)), q, tol=1e-5, max_iterations=100_000)
    r["ref_ours_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = dense_log_sinkhorn(scores(x, c, "l2"), q, 0.005, 1e-5)
    r["ref_dense_seconds"] = time.perf_counter() - t0
    a, b = ours.log_duals - ours.log_duals.mean(), ref - ref.mean()
    r["ref_dual_rel_diff"] = float(np.abs(a - b).max() / np.abs(b).max())
    print(
        f"  Sinkhorn alone (tol 1e-5) {r['ref_ours_seconds']:.2f} s vs dense float64 log-domain"
        f" {r['ref_dense_seconds']:.2f} s: x{r['ref_ours_seconds'] / r['ref_dense_seconds']:.3f};"
        f" log-duals rel. diff {r['ref_dual_rel_diff']:.1e}",
        flush=True,
    )


def exactness(r: dict) -> None:
    n, k = 4000, 20
    w = np.full(5, 0.5 / 4)
    w[0] = 0.5
    x, _ = mixture(n, 32, 5, seed=0, weights=w)
    data = ArrayData(x)
    params = KMeansParams(k=k, iterations=20, seed=0)
    c = fit(data, params, init_state(data, params)[0]).centroids
    t0 = time.perf_counter()
    result = balanced_duals(RowBlock(x, c, "l2", n), BoundaryBlock(x, c, "l2"), proportions(k), n)
    r["small_seconds"] = time.perf_counter() - t0
    D = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    t0 = time.perf_counter()
    best = ot.emd2(np.full(n, 1 / n), integer_targets(proportions(k), n) / n, D) * n
    r["small_emd_seconds"] = time.perf_counter() - t0
    block = RowBlock(x, c, "l2", n)
    for name, beta in (("sinkhorn_only", result.sinkhorn.beta), ("corrected", result.beta)):
        labels = block.labels(beta)
        r[f"small_{name}"] = {
            "sizes": size_stats(np.bincount(labels, minlength=k)),
            "cost_ratio": float(D[np.arange(n), labels].sum() / best),
        }
    r["small_sinkhorn_steps"] = result.sinkhorn.iterations
    r["small_passes"] = result.sizes.passes
    print("1. 4000 x 32, k = 20, one mode holding half the rows (exact optimum: ot.emd2)")
    for name in ("sinkhorn_only", "corrected"):
        s = r[f"small_{name}"]
        print(
            f"  {name:14s} sizes {s['sizes']['min']}..{s['sizes']['max']}  max/min "
            f"{s['sizes']['max_over_min']:.3f}  cost x{s['cost_ratio']:.4f} of the optimum"
        )
    print(
        f"  time: {result.sinkhorn.iterations} Sinkhorn steps and {result.sizes.passes} passes "
        f"{r['small_seconds']:.2f} s; ot.emd2 {r['small_emd_seconds']:.2f} s",
        flush=True,
    )
    reference(r, x, c)


def runs(r: dict, tag: str, root, k: int, repeats: int) -> None:
    """Whole runs, plain and --balanced alternately; sums of wall times."""
    out = OUT / f"balanced-{tag}"
    totals = {"plain": 0.0, "balanced": 0.0}
    for i in range(repeats):
        for name in ("plain", "balanced"):
            shutil.rmtree(out, ignore_errors=True)
            config = build(
                input=str(root),
                output=str(out),
                k=k,
                iterations=10,
                tol=0,
                init="random",
                seed=1,
                balanced=name == "balanced",
                balance_sample=64,  # the Sinkhorn sample these rows are quoted at
            )
            t0 = time.perf_counter()
            manifest = run(config)
            seconds = time.perf_counter() - t0
            totals[name] += seconds
            r[f"{tag}_{name}_{i}"] = {"seconds": seconds, "timings": manifest["timings"]}
            if name == "balanced":
                b = manifest["balance"]
                r[f"{tag}_balance_{i}"] = {
                    "sizes": manifest["clusters"]["balance"],
                    "nearest_sizes": manifest["clusters"]["nearest"]["balance"],
                    "sample_rows": b["sample_rows"],
                    "sinkhorn_steps": b["sinkhorn"]["iterations"],
                    "passes": b["sizes"]["passes"],
                    "seconds": b["seconds"],
                }
            print(f"  {name:8s} run {i + 1}: {seconds:6.1f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    r[f"{tag}_ratio"] = totals["balanced"] / totals["plain"]
    b = r[f"{tag}_balance_{repeats - 1}"]
    print(
        f"  whole run --balanced / plain: x{r[f'{tag}_ratio']:.3f}; balance stage "
        f"{b['seconds']:.1f} s (Sinkhorn {b['sinkhorn_steps']} steps on {b['sample_rows']} rows,"
        f" {b['passes']} passes); sizes {b['sizes']['min']}..{b['sizes']['max']} max/min "
        f"{b['sizes']['max_over_min']:.3f} (nearest: max/min "
        f"{b['nearest_sizes']['max_over_min']:.2f})",
        flush=True,
    )


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sela-rows", type=int, default=300_000)
    p.add_argument("--sela-k", type=int, default=3000)
    p.add_argument("--skip-runs", action="store_true", help="only the small exactness case")
    a = p.parse_args()
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "cores": os.cpu_count()}
    exactness(r)
    if not a.skip_runs:
        print(f"2. whole runs, {a.rows} x {a.dim}, k = {a.k}")
        root, _ = dataset(a.rows, a.dim)
        runs(r, "scale", root, a.k, a.repeats)
        print(f"3. SeLa's setting scaled: {a.sela_rows} x {a.dim}, k = {a.sela_k}")
        root, _ = dataset(a.sela_rows, a.dim, components=a.sela_k)
        runs(r, "sela", root, a.sela_k, 1)
    print(f"  results: {save('balanced', r)}")


if __name__ == "__main__":
    main()
