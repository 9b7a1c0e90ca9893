"""Object storage against a local folder, and the cost of a checkpoint per iteration.

    python -m bench.storage [--rows 1000000] [--dim 128] [--k 1024] [--repeats 2]

The same ``pseudolabel run`` (10 Lloyd iterations, label pass) with input and output in
a local folder, and with both in S3 served by moto on loopback. The client talks to moto
directly: the tests' fault-injecting proxy is not in the path (``S3(proxy=False)``), but
moto is itself a Python HTTP server holding the objects in memory, and a real store adds
its network. Every run starts cold, in a Ray session of its own (start-up excluded from
the times), and the order alternates, local, s3, s3, local, ..., so neither side gains
from coming first or second; the driver process and the page cache stay warm for both.
Reported: per side the median over ``--repeats`` runs and the ratios of the medians.
Checkpoint overhead is the time spent writing checkpoints over the time of the
iterations, from the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time

import ray

from bench.common import OUT, dataset, save, size_parser, start_ray
from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.config import build
from tests.s3server import S3


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1024)
    p.add_argument("--repeats", type=int, default=2, help="runs per side")
    a = p.parse_args()
    root, _ = dataset(a.rows, a.dim)
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "cores": os.cpu_count()}
    r["proxy_in_path"] = False
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request
    s3 = S3(proxy=False)
    fs = s3.fs()
    fs.mkdir("bench")
    t0 = time.perf_counter()
    fs.put(str(root) + "/", "bench/emb/", recursive=True)
    r["upload_seconds"] = time.perf_counter() - t0
    common = dict(k=a.k, iterations=10, tol=0, init="random", seed=1)
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    order = [("local", "s3") if i % 2 == 0 else ("s3", "local") for i in range(a.repeats)]
    r["order"] = [name for pair in order for name in pair]
    for i, name in enumerate(r["order"]):
        # A fresh output per run: an existing one would be resumed from its checkpoints.
        local_out = OUT / f"storage-local-{i}"
        settings = (
            dict(input=str(root), output=str(local_out))
            if name == "local"
            else dict(
                input="s3://bench/emb", output=f"s3://bench/run-{i}", storage_options=s3.options()
            )
        )
        ray_start = start_ray(os.cpu_count())  # cold: no process of an earlier run remains
        try:
            t0 = time.perf_counter()
            manifest = run(build(**common, **settings))
            total = time.perf_counter() - t0
        finally:
            ray.shutdown()
            shutil.rmtree(local_out, ignore_errors=True)
        t, fit = manifest["timings"], manifest["fit"]["seconds"]
        one = {
            "ray_start": ray_start,
            "total": total,
            "fit": t["fit"],
            "load": fit["load"],
            "label": t["label"] + t["publish"],
            "checkpoint_share": fit.get("checkpoint", 0.0) / fit["iterations"],
        }
        runs[name].append(one)
        print(
            f"run {i + 1} {name:5s}: whole {total:.1f} s, fit {one['fit']:.1f} s (load "
            f"{one['load']:.1f} s), label {one['label']:.1f} s, checkpoints "
            f"{100 * one['checkpoint_share']:.2f}% of iteration time",
            flush=True,
        )
    r["runs"] = runs
    for name, rs in runs.items():
        for part in ("total", "fit", "label", "checkpoint_share"):
            r[f"{name}_{part}"] = statistics.median(x[part] for x in rs)
    for part in ("fit", "label", "total"):
        r[f"{part}_ratio"] = r[f"s3_{part}"] / r[f"local_{part}"]
    print(f"medians of {a.repeats} cold run(s) per side, order {' '.join(r['order'])}:")
    for name in runs:
        print(
            f"  {name:5s}: whole {r[f'{name}_total']:.1f} s, fit {r[f'{name}_fit']:.1f} s, "
            f"label {r[f'{name}_label']:.1f} s, checkpoints "
            f"{100 * r[f'{name}_checkpoint_share']:.2f}% of iteration time"
        )
    print(
        f"S3 (moto on loopback, no proxy) / local folder: fit x{r['fit_ratio']:.2f}, label "
        f"x{r['label_ratio']:.2f}, whole run x{r['total_ratio']:.2f}"
    )
    print(f"  results: {save('storage', r)}")
    s3.stop()


if __name__ == "__main__":
    main()
