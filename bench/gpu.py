"""The GPU assignment step against the device's own matrix-multiply peak, same run.

    python -m bench.gpu [--rows 2000000] [--dim 128] [--k 4096]

Peak: the best of a few large float32 and TF32 matmuls on this device. Assignment: the
k-means step as a GPU worker runs it (ops.gpu.DeviceRows.partial_stats: scores by GEMM,
argmax, float64 scatter-add), counted as 2 n k d FLOP. Prints GFLOP/s and the fraction
of peak, and appends the numbers, with the device named, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=4096)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device; none is visible here")
    from pseudolabel.ops.gpu import DeviceRows, backend

    device = torch.cuda.get_device_name(0)
    n, d, k = a.rows, a.dim, a.k

    def best_matmul(tf32: bool, size: int = 8192, reps: int = 10) -> float:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        A = torch.randn(size, size, device="cuda")
        B = torch.randn(size, size, device="cuda")
        A @ B
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            A @ B
        torch.cuda.synchronize()
        return 2 * size**3 * reps / (time.perf_counter() - t0) / 1e9

    peak_fp32, peak_tf32 = best_matmul(False), best_matmul(True)
    torch.backends.cuda.matmul.allow_tf32 = False  # assignment below runs in float32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    centroids = x[rng.choice(n, k, replace=False)]
    rows = DeviceRows(x, "cuda")
    rows.partial_stats(centroids, "l2")  # warm-up
    torch.cuda.synchronize()
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        rows.partial_stats(centroids, "l2")
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    gflops = 2 * n * k * d / seconds / 1e9
    lines = [
        f"\n## {device}, {datetime.date.today().isoformat()}\n",
        "`python -m bench.gpu "
        f"--rows {n} --dim {d} --k {k}` (search backend of workers: {backend()})\n",
        f"- matmul peak, same run: {peak_fp32:,.0f} GFLOP/s float32, {peak_tf32:,.0f} TF32",
        f"- assignment step (scores, argmax, float64 sums): {seconds * 1e3:.1f} ms per pass, "
        f"{gflops:,.0f} GFLOP/s = {gflops / peak_fp32:.0%} of the float32 peak",
    ]
    print("\n".join(lines))
    with (Path(__file__).parent / "RESULTS.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
