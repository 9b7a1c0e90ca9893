"""Object storage against a local folder, and the cost of a checkpoint per iteration.

    python -m bench.storage [--rows 1000000] [--dim 128] [--k 1024]

The same ``pseudolabel run`` (10 Lloyd iterations, label pass) twice: input and output in
a local folder, then both in S3 served by moto on loopback (the objects live in moto's
memory; a real store adds its network). Ray start-up excluded. Checkpoint overhead is
the time spent writing checkpoints over the time of the iterations, from the manifest.
"""

from __future__ import annotations

import os
import shutil
import time

from bench.common import OUT, dataset, save, size_parser, start_ray
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.config import build
from tests.s3server import S3


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1024)
    a = p.parse_args()
    root, _ = dataset(a.rows, a.dim)
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "cores": os.cpu_count()}
    s3 = S3()
    fs = s3.fs()
    fs.mkdir("bench")
    t0 = time.perf_counter()
    fs.put(str(root) + "/", "bench/emb/", recursive=True)
    r["upload_seconds"] = time.perf_counter() - t0
    r["ray_start"] = start_ray(os.cpu_count())
    local_out = OUT / "storage-local"
    shutil.rmtree(local_out, ignore_errors=True)
    common = dict(k=a.k, iterations=10, tol=0, init="random", seed=1)
    for name, settings in (
        ("local", dict(input=str(root), output=str(local_out))),
        ("s3", dict(input="s3://bench/emb", output="s3://bench/run", storage_options=s3.options())),
    ):
        t0 = time.perf_counter()
        manifest = run(build(**common, **settings))
        r[f"{name}_total"] = time.perf_counter() - t0
        t, fit = manifest["timings"], manifest["fit"]["seconds"]
        r[f"{name}_fit"], r[f"{name}_label"] = t["fit"], t["label"] + t["publish"]
        r[f"{name}_checkpoint_share"] = fit.get("checkpoint", 0.0) / fit["iterations"]
        print(
            f"{name:5s}: fit {t['fit']:.1f} s (load {fit['load']:.1f} s), label "
            f"{r[f'{name}_label']:.1f} s, checkpoints {100 * r[f'{name}_checkpoint_share']:.2f}%"
            " of iteration time",
            flush=True,
        )
    for part in ("fit", "label", "total"):
        r[f"{part}_ratio"] = r[f"s3_{part}"] / r[f"local_{part}"]
    print(
        f"S3 (moto on loopback) / local folder: fit x{r['fit_ratio']:.2f}, label "
        f"x{r['label_ratio']:.2f}, whole run x{r['total_ratio']:.2f}"
    )
    print(f"  results: {save('storage', r)}")
    shutil.rmtree(local_out, ignore_errors=True)
    s3.stop()


if __name__ == "__main__":
    main()
