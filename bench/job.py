"""The whole job, parquet in to parquet labels out, against a plain faiss script.

    python -m bench.job [--rows 1000000] [--dim 128] [--k 1024] [--iterations 10] [--rounds 2]
    python -m bench.job --data patches --k 256 --iterations 20     # real data: 133,140 x 192

Each side is a fresh process timed from launch to exit, in alternating rounds:

* plain: pyarrow reads the shards, ``faiss.Kmeans`` (subsampling off, all cores) fits,
  its index labels every row, pyarrow writes id, label and distance;
* ``pseudolabel run`` as a user runs it (plan, fit, label, verify, report, commit):
  ``local``, the default for a job this size (``--backend auto``: in this process, no
  Ray); ``ray``, the same on an embedded Ray (``--backend ray``: Ray's start and actors,
  the fit's workers label the rows they hold); ``stream``, on Ray with ``--label-from
  stream`` (a Ray Data pass reads the input again).

The data: the benchmarks' Gaussian mixture (--rows x --dim), or real data (--data
patches: the 8 x 8 RGB patches of two photographs, ``bench.common.image_patches``).

Reported: the median time of each, their ratios to plain's, and each side's objective
(the labelled rows' summed squared distances) as a ratio to plain's.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import OUT, dataset, image_patches, save, size_parser

SIDES = ("plain", "local", "ray", "stream")
# Each pseudolabel side: its flags, and the backend and label source its manifest shows.
RUNS = {
    "local": ((), "local", "workers"),
    "ray": (("--backend", "ray"), "ray", "workers"),
    "stream": (("--backend", "ray", "--label-from", "stream"), "ray", "stream"),
}


def plain(root: str, out: str, k: int, iterations: int) -> None:
    """The single-process job (run in its own process by ``main``); prints its objective."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(root, columns=["id", "embedding"])
    emb = table.column("embedding").combine_chunks()
    x = emb.flatten().to_numpy().reshape(len(emb), -1)
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=1, max_points_per_centroid=len(x))
    km.train(x)
    D, I = km.index.search(x, 1)
    Path(out).mkdir(parents=True)
    labels = pa.table(
        {"id": table.column("id"), "label": I[:, 0].astype(np.int32), "distance": D[:, 0]}
    )
    pq.write_table(labels, f"{out}/labels.parquet")
    print(json.dumps({"objective": float(D.sum(dtype=np.float64))}))


def side(name: str, root: Path, k: int, iterations: int) -> tuple[float, float]:
    """(seconds from launch to exit, objective) of one run of ``name``."""
    out = OUT / f"job-{name}"
    shutil.rmtree(out, ignore_errors=True)
    if name == "plain":
        argv = [sys.executable, "-m", "bench.job", "--plain", str(root), str(out), str(k),
                str(iterations)]  # fmt: skip
    else:
        argv = [str(Path(sys.executable).parent / "pseudolabel"), "-q", "run", "--input",
                str(root), "--output", str(out), "--k", str(k), "--iterations",
                str(iterations), "--tol", "0", *RUNS[name][0]]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    if name == "plain":
        objective = json.loads(done.stdout.strip().splitlines()[-1])["objective"]
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        where = (manifest["backend"]["name"], manifest["label"]["source"])
        assert where == RUNS[name][1:], where
        objective = manifest["metrics"]["label_distance_sum"]
    shutil.rmtree(out, ignore_errors=True)
    return seconds, objective


def main() -> None:
    if sys.argv[1:2] == ["--plain"]:
        root, out, k, iterations = sys.argv[2:6]
        plain(root, out, int(k), int(iterations))
        return
    p = size_parser(rows=1_000_000, dim=128, k=1024)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", choices=("mixture", "patches"), default="mixture")
    a = p.parse_args()
    root, x = image_patches() if a.data == "patches" else dataset(a.rows, a.dim)
    a.rows, a.dim = x.shape
    runs: dict[str, list[tuple[float, float]]] = {s: [] for s in SIDES}
    for r in range(a.rounds):
        for name in SIDES:
            runs[name].append(side(name, root, a.k, a.iterations))
            seconds, objective = runs[name][-1]
            print(
                f"round {r + 1} {name:8s} {seconds:7.2f} s  objective {objective:.6e}", flush=True
            )
    median = {s: statistics.median(t for t, _ in runs[s]) for s in SIDES}
    objective = {s: statistics.median(o for _, o in runs[s]) for s in SIDES}
    results = {
        "data": a.data, "rows": a.rows, "dim": a.dim, "k": a.k, "iterations": a.iterations,
        "seconds": {s: [round(t, 2) for t, _ in runs[s]] for s in SIDES},
        "objective": objective,
    }  # fmt: skip
    for s in RUNS:
        results[f"{s}_time_ratio"] = round(median[s] / median["plain"], 3)
        results[f"{s}_objective_ratio"] = round(objective[s] / objective["plain"], 4)
        print(
            f"pseudolabel run {' '.join(RUNS[s][0]) or '(defaults)'}: "
            f"x{results[f'{s}_time_ratio']} of plain's time (median {median[s]:.2f} s "
            f"against {median['plain']:.2f} s), objective x{results[f'{s}_objective_ratio']}"
        )
    results["local_to_ray"] = round(median["local"] / median["ray"], 3)
    results["workers_to_stream"] = round(median["ray"] / median["stream"], 3)
    print(f"in this process: x{results['local_to_ray']} of the same run on Ray")
    print(f"on Ray, --label-from workers: x{results['workers_to_stream']} of stream's time")
    print(f"saved {save('job' if a.data == 'mixture' else f'job-{a.data}', results)}")


if __name__ == "__main__":
    main()
