"""Curation of a long-tailed synthetic mixture: time and size balance.

    python -m bench.curate [--rows 1000000] [--dim 64] [--levels 5000,2000,1000]

1,000 components with Zipf weights (p ~ 1 / rank) make a long tail; ``pseudolabel
curate`` selects --sample-size ids. Balance is measured on the true components: the
selection's size distribution against a uniform random sample of the same size.

The mixture has no structure above its components (their means are random, about
equally far apart), so a level with fewer clusters than components groups rare
components arbitrarily, and balancing over those groups favours the dense components:
try --levels 5000,500,50 to see it. Levels at or above the component count keep it.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq

from bench.common import OUT, save, size_parser, start_ray
from pseudolabel.ops.metrics import size_stats
from pseudolabel.pipelines.commands.curate import curate
from pseudolabel.pipelines.config import CurateConfig, build_config
from tests.data import long_tail_weights, mixture, write_parquet_shards


def main() -> None:
    p = size_parser(rows=1_000_000, dim=64, k=None)
    p.add_argument("--levels", default="5000,2000,1000")
    p.add_argument("--sample-size", type=int, default=100_000)
    a = p.parse_args()
    levels = CurateConfig(levels=a.levels).level_sizes()
    components = 1000
    x, truth = mixture(a.rows, a.dim, components, seed=5, weights=long_tail_weights(components))
    work = OUT / "curate"
    shutil.rmtree(work, ignore_errors=True)
    write_parquet_shards(work / "in", x, 16, truth=truth, row_group_rows=16384)
    del x
    r: dict = {"rows": a.rows, "dim": a.dim, "levels": levels, "sample_size": a.sample_size}
    r["ray_start"] = start_ray(os.cpu_count())
    t0 = time.perf_counter()
    manifest = curate(
        build_config(
            CurateConfig,
            input=str(work / "in"),
            output=str(work / "out"),
            levels=a.levels,
            sample_size=a.sample_size,
            strategy="random",
            iterations=10,
            resampling_steps=2,
        )
    )
    r["seconds"] = time.perf_counter() - t0
    ids = pq.read_table(work / "out" / "selection", columns=["id"]).column("id").to_numpy()
    curated = size_stats(np.bincount(truth[ids], minlength=components))
    uniform = size_stats(
        np.bincount(
            truth[np.random.default_rng(0).choice(a.rows, a.sample_size, replace=False)],
            minlength=components,
        )
    )
    r.update(curated=curated, uniform=uniform, level1_run=manifest["level1_run"])
    print(
        f"Curation, {a.rows} x {a.dim}, {components} Zipf components, levels {levels}: "
        f"{r['seconds']:.1f} s for {len(ids)} ids"
    )
    for name, s in (("selection", curated), ("uniform sample", uniform)):
        print(
            f"  {name:14s} largest component {s['max']:6d}  normalised entropy "
            f"{s['entropy']:.3f}  CV {s['cv']:.2f}  components absent {s['empty']}"
        )
    print(f"  results: {save('curate', r)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
