"""Balanced labelling: Sinkhorn over the workers, and the label pass with its duals.

    python -m bench.balanced [--rows 1000000] [--dim 128] [--k 1000]

1. Lloyd (10 iterations) gives the centroids; 2 ShardWorkers hold the rows.
2. Sinkhorn over the workers (default eps, tol), timed.
3. The label pass twice, plain and with the duals (same pool), timed: the balanced pass
   should cost at most 1.2x the plain one; its max/min cluster size should be <= 1.1.
4. Reference, same run: a dense float64 log-domain Sinkhorn in one process (scipy
   logsumexp, same eps schedule and tol) against ours in one process, on a 20k-row
   subsample (1M x 1000 in float64 does not fit this machine, and plain log-domain
   steps cost two logsumexps over n x k): time and log-duals.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import ray
from scipy.special import logsumexp

from bench.common import OUT, dataset, save, size_parser, start_ray, timer
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.ops.metrics import size_stats
from pseudolabel.ops.sinkhorn import RowBlock, epsilon_schedule, proportions, scores, sinkhorn
from pseudolabel.pipelines.config import build
from pseudolabel.pipelines.io.layout import npy_bytes
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.session import size_pools
from pseudolabel.pipelines.runtime.shards import ResidentShards
from pseudolabel.pipelines.runtime.sinkhorn import SinkhornShards
from pseudolabel.pipelines.stages.label import LabelPool, LabelSpec, label_pass


def dense_log_sinkhorn(S: np.ndarray, q: np.ndarray, epsilon: float, tol: float) -> tuple:
    """The reference: plain log-domain Sinkhorn, float64, dense, eps-scaled like ours.
    Returns (log-duals at the final eps, steps)."""
    n = len(S)
    scale = S.std()
    beta = np.zeros(len(q))
    steps = 0
    for eps in epsilon_schedule(scale, epsilon * scale):
        Z = S.astype(np.float64) / eps
        g = beta / eps
        while True:
            f = -np.log(n) - logsumexp(Z + g, axis=1)
            lse = logsumexp(Z + f[:, None], axis=0)
            err = np.abs(np.exp(lse + g) - q).sum()
            steps += 1
            if err < tol:
                break
            g = np.log(q) - lse
        beta = g * eps
    return g, steps


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1000)
    p.add_argument("--reference-rows", type=int, default=5_000)
    p.add_argument("--reference-epsilon", type=float, default=0.05)
    a = p.parse_args()
    root, x = dataset(a.rows, a.dim)
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "cores": os.cpu_count()}
    r["ray_start"] = start_ray(os.cpu_count())
    config = build(input=str(root), output="unused", k=a.k, balanced=True)
    sizing = size_pools(config, ray.cluster_resources())
    plan = make_plan(str(root), ReadSettings())
    settings = ReadSettings(dim=plan.dim)
    data = ResidentShards.from_plan(
        plan, settings, WorkerSpec("l2", threads=sizing.worker_threads), sizing.workers
    )
    try:
        params = KMeansParams(k=a.k, iterations=10, tol=0, seed=1, init="random")
        with timer(r, "lloyd_fit"):
            state = fit(data, params, init_state(data, params)[0])
        centroids = state.centroids
        with timer(r, "sinkhorn"):
            rows = SinkhornShards(data, centroids, config.score_cache_gb * 2**30)
            result = sinkhorn(
                rows,
                proportions(a.k),
                config.epsilon,
                config.sinkhorn_tol,
                config.sinkhorn_iterations,
            )
        r["sinkhorn_cached"] = rows.cached
        print(f"sinkhorn: {result.iterations} steps in {r['sinkhorn']:.1f} s", flush=True)
    finally:
        data.shutdown()
    r.update(
        sinkhorn_steps=result.iterations,
        sinkhorn_error=result.marginal_error,
        sinkhorn_converged=result.converged,
        epsilon=result.epsilon,
    )

    work = OUT / "balanced-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    c_loc, d_loc = resolve(str(work / "centroids.npy")), resolve(str(work / "duals.npy"))
    c_loc.write_bytes(npy_bytes(centroids))
    d_loc.write_bytes(npy_bytes(result.log_duals))
    pool = LabelPool(sizing.label_workers, config.cpus_per_worker, 0, config.label_batch_rows)
    plain = LabelSpec("l2", threads=sizing.label_threads)
    balanced = LabelSpec(
        "l2", threads=sizing.label_threads, duals=d_loc.url, epsilon=result.epsilon
    )
    # Warm the Ray workers once so both timed passes start alike; then alternate.
    label_pass(plan, settings, c_loc, plain, pool, resolve(str(work / "warm")))
    for name, spec in (
        ("label_plain", plain),
        ("label_balanced", balanced),
        ("label_plain_2", plain),
        ("label_balanced_2", balanced),
    ):
        t0 = time.perf_counter()
        label_pass(plan, settings, c_loc, spec, pool, resolve(str(work / name)))
        r[name] = time.perf_counter() - t0
        print(f"{name}: {r[name]:.2f} s", flush=True)
    r["label_ratio"] = (r["label_balanced"] + r["label_balanced_2"]) / (
        r["label_plain"] + r["label_plain_2"]
    )
    table = pq.read_table(work / "label_balanced", columns=["label", "nearest_label"])
    for column in ("label", "nearest_label"):
        sizes = np.bincount(table.column(column).to_numpy(), minlength=a.k)
        r[f"{column}_balance"] = size_stats(sizes)
    shutil.rmtree(work, ignore_errors=True)

    sub = x[np.random.default_rng(0).choice(len(x), a.reference_rows, replace=False)]
    block = RowBlock(sub, centroids, "l2", len(sub))
    q = proportions(a.k)
    # Both solved tightly (1e-5), so the duals are compared, not two stopping points.
    with timer(r, "ref_ours"):
        ours = sinkhorn(block, q, a.reference_epsilon, 1e-5, 100_000)
    S = scores(sub, centroids, "l2")
    with timer(r, "ref_dense"):
        ref_g, ref_steps = dense_log_sinkhorn(S, q, a.reference_epsilon, 1e-5)
    both = [ours.log_duals - ours.log_duals.mean(), ref_g - ref_g.mean()]
    r["ref_dual_rel_diff"] = float(np.abs(both[0] - both[1]).max() / np.abs(both[1]).max())
    r["ref_steps"], r["ref_ours_steps"] = ref_steps, ours.iterations
    ref_labels = (S / ours.epsilon + ref_g).argmax(1)
    r["ref_label_agreement"] = float((block.labels(ours.beta) == ref_labels).mean())
    r["ref_time_ratio"] = r["ref_ours"] / r["ref_dense"]

    lb, nb = r["label_balance"], r["nearest_label_balance"]
    print(f"Balanced labelling, {a.rows} x {a.dim}, k={a.k}, {r['cores']} cores")
    print(
        f"  Sinkhorn on {sizing.workers} workers   {r['sinkhorn']:7.1f} s  "
        f"{result.iterations} steps, size error {result.marginal_error:.1e}, "
        f"scores cached {r['sinkhorn_cached']}"
    )
    print(f"  label pass plain        {r['label_plain']:6.2f} / {r['label_plain_2']:.2f} s")
    print(
        f"  label pass balanced     {r['label_balanced']:6.2f} / {r['label_balanced_2']:.2f} s"
        f"  ratio x{r['label_ratio']:.3f}"
    )
    print(
        f"  cluster sizes balanced  {lb['min']}..{lb['max']}  max/min {lb['max_over_min']:.3f}"
        f"  (nearest {nb['min']}..{nb['max']}, max/min {nb['max_over_min']:.2f})"
    )
    print(
        f"  reference, {a.reference_rows} rows: ours {r['ref_ours']:.1f} s ({ours.iterations} "
        f"steps) vs dense float64 log-domain {r['ref_dense']:.1f} s ({ref_steps} steps): "
        f"time x{r['ref_time_ratio']:.3f}, log-duals rel. diff {r['ref_dual_rel_diff']:.1e}, "
        f"labels agree {r['ref_label_agreement']:.4f}"
    )
    print(f"  results: {save('balanced', r)}")


if __name__ == "__main__":
    main()
