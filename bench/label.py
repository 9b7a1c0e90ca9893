"""The label pass against a plain single-process loop, parquet to parquet.

    python -m bench.label [--rows 1000000] [--dim 128] [--k 1024]

Plain loop: for each shard, pyarrow read -> faiss search (all cores) -> pyarrow write of
id, label, distance. pseudolabel, two ways:
* in this process: ``pseudolabel label --backend local`` with the same centroids, as a
  user runs it on data that fits (one worker reads every row, validated, and labels
  them into staging): its manifest's label stage (the read included), and the whole
  command (plan, verification, publish and report too);
* on Ray: the Ray Data pass of ``pseudolabel run`` (read, Labeler actor pool, write to
  staging), sized as the CLI sizes it, Ray start-up excluded, cold then warm.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from bench.common import OUT, dataset, save, size_parser, start_ray, timer
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.pipelines.cli import main as cli_main
from pseudolabel.pipelines.config import build
from pseudolabel.pipelines.io.layout import npy_bytes
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.runtime.session import size_pools
from pseudolabel.pipelines.stages.label import LabelPool, LabelSpec, label_pass


def plain_loop(root, centroids, out) -> int:
    index = CentroidIndex(centroids)
    rows = 0
    for path in sorted(root.glob("*.parquet")):
        table = pq.read_table(path)
        emb = table.column("embedding").combine_chunks()
        x = emb.flatten().to_numpy().reshape(len(emb), -1)
        D, I = index.search(x)
        pq.write_table(
            pa.table(
                {"id": table.column("id"), "label": I[:, 0].astype(np.int32), "distance": D[:, 0]}
            ),
            out / path.name,
        )
        rows += len(x)
    return rows


def main() -> None:
    p = size_parser(rows=1_000_000, dim=128, k=1024)
    a = p.parse_args()
    root, x = dataset(a.rows, a.dim)
    centroids = x[np.random.default_rng(0).choice(len(x), a.k, replace=False)]
    work = OUT / "label-work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "plain").mkdir(parents=True)
    r: dict = {"rows": a.rows, "dim": a.dim, "k": a.k, "cores": os.cpu_count()}

    with timer(r, "plain_loop"):
        assert plain_loop(root, centroids, work / "plain") == a.rows

    # In this process, before Ray starts (``--backend local`` would run so beside it too).
    np.save(work / "centroids-local.npy", centroids)
    argv = ["-q", "label", "--input", str(root), "--output", str(work / "local"),
            "--centroids", str(work / "centroids-local.npy"), "--backend", "local"]  # fmt: skip
    with timer(r, "local_command"):
        assert cli_main(argv) == 0
    manifest = json.loads((work / "local" / "manifest.json").read_text())
    assert manifest["label"]["source"] == "reread" and manifest["rows"]["output"] == a.rows
    r["local"] = manifest["timings"]["label"]

    r["ray_start"] = start_ray(os.cpu_count())
    config = build(input=str(root), output=str(work / "ours"), k=a.k)
    sizing = size_pools(config, ray.cluster_resources())
    plan = make_plan(str(root), ReadSettings())
    centroids_loc = resolve(str(work / "centroids.npy"))
    centroids_loc.write_bytes(npy_bytes(centroids))
    spec = LabelSpec(metric="l2", topk=0, threads=sizing.label_threads)
    pool = LabelPool(sizing.label_workers, config.cpus_per_worker, 0, config.label_batch_rows)
    # The first pass in a fresh Ray pays for worker processes and imports (what one
    # `pseudolabel run` pays); the second shows the steady state of the same pass.
    for name in ("ours", "ours_warm"):
        with timer(r, name):
            label_pass(
                plan,
                ReadSettings(dim=plan.dim),
                centroids_loc,
                spec,
                pool,
                resolve(str(work / name)),
            )
        written = pq.read_table(work / name, columns=["label"]).num_rows
        assert written == a.rows, written
    r["label_workers"] = sizing.label_workers
    r["local_rows_per_s"] = a.rows / r["local"]
    r["local_time_ratio"] = r["local"] / r["plain_loop"]
    r["local_command_ratio"] = r["local_command"] / r["plain_loop"]
    r["ours_rows_per_s"] = a.rows / r["ours"]
    r["plain_rows_per_s"] = a.rows / r["plain_loop"]
    r["time_ratio"] = r["ours"] / r["plain_loop"]
    r["time_ratio_warm"] = r["ours_warm"] / r["plain_loop"]
    print(f"Label pass, {a.rows} x {a.dim} parquet -> parquet, k={a.k}, {r['cores']} cores")
    print(
        f"  plain loop (read, faiss, write)   {r['plain_loop']:6.2f} s  "
        f"{r['plain_rows_per_s']:,.0f} rows/s"
    )
    print(
        f"  pseudolabel in this process       {r['local']:6.2f} s  "
        f"{r['local_rows_per_s']:,.0f} rows/s  (its label stage)  "
        f"time x{r['local_time_ratio']:.3f}; the whole command {r['local_command']:.2f} s, "
        f"x{r['local_command_ratio']:.3f}"
    )
    print(
        f"  pseudolabel Ray Data pass         {r['ours']:6.2f} s  "
        f"{r['ours_rows_per_s']:,.0f} rows/s  ({sizing.label_workers} labeler actors)  "
        f"time x{r['time_ratio']:.3f}"
    )
    print(
        f"  same pass again, Ray warm         {r['ours_warm']:6.2f} s  "
        f"{a.rows / r['ours_warm']:,.0f} rows/s  time x{r['time_ratio_warm']:.3f}"
    )
    print(f"  results: {save('label', r)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
