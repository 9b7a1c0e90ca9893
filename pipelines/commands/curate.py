"""``pseudolabel curate``: hierarchical k-means, then a balanced sample of the ids.

    OUTPUT/level1/               a full ``pseudolabel run`` with k = the first level
                                 (checkpoints, resume, labels with distances)
    OUTPUT/hierarchy/            centroids-level-L.npy, parents-level-L.npy (no pickle)
    OUTPUT/selection/*.parquet   id, level_1 .. level_L: each selected id once, with its
                                 cluster at every level
    OUTPUT/manifest.json, _SUCCESS (last)

Level 1 runs on the Ray workers (``commands.run``), with the resampling refinement
there too; the levels above cluster centroids, a few thousand rows, in process with the
same k-means loop. Sampling never brings the rows to the driver: the level-1 cluster
sizes give each cluster's quota, top down (``ops.hierarchical.sample_quotas``), and Ray
tasks partitioned by label pick each cluster's rows from the label files
(``runtime.label_partitions.cluster_selection``); the driver receives the selection.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.ops.hierarchical import sample_quotas, upper_levels
from pseudolabel.ops.metrics import size_stats
from pseudolabel.pipelines.commands.run import run, versions
from pseudolabel.pipelines.config import CurateConfig
from pseudolabel.pipelines.io.fingerprint import refuse_stale, run_fingerprint
from pseudolabel.pipelines.io.layout import CENTROIDS, LABELS, RunOutput, load_npy, npy_bytes
from pseudolabel.pipelines.io.plan import SUFFIXES
from pseudolabel.pipelines.io.storage import Location, resolve
from pseudolabel.pipelines.runtime.label_partitions import cluster_selection
from pseudolabel.pipelines.runtime.session import run_session
from pseudolabel.pipelines.stages.verify import count_labels

log = logging.getLogger("pseudolabel")

SELECTION_FILE_ROWS = 1_000_000


def curate(config: CurateConfig) -> dict[str, Any]:
    """Cluster in ``config.levels`` and write a balanced selection of ``sample_size`` ids."""
    levels, sample_size, strategy = config.level_sizes(), config.sample_size, config.strategy
    t0 = time.perf_counter()
    root = resolve(config.output, config.storage_options)
    output = RunOutput(root)
    # Reused only by a curation of the same settings and input; a crashed one is
    # continued only as far as its level-1 run has the same settings (run() checks).
    fingerprint = run_fingerprint(config, tuple(SUFFIXES))
    if output.committed() and not config.overwrite:
        previous = output.manifest()
        refuse_stale(root.url, "a finished curation", previous.get("fingerprint"), fingerprint)
        log.info("%s is complete (_SUCCESS); --overwrite recomputes it", root.url)
        return previous
    # Seeding decides whether rare concepts get clusters of their own: k-means++ even
    # above the k where `auto` switches to random seeds for speed (measured: random
    # seeds left 19 of 200 long-tail components without a cluster, k-means++ none).
    init = "kmeans++" if config.init == "auto" else config.init
    level1_config = config.level1_config(init=init, output=root.join("level1").url)
    level1 = run(level1_config)

    params = level1_config.kmeans_params()
    centroids = load_npy(root.join("level1", CENTROIDS))
    tree = upper_levels(
        centroids,
        levels[1:],
        params,
        config.resampling_steps,
        config.resample_size,
        config.resample_strategy,
    )
    files = root.join("level1", LABELS).files([".parquet"])
    sizes = count_labels(files, levels[0])["label"].sizes
    cluster_paths = tree.paths(np.arange(levels[0]))
    rng = np.random.default_rng(config.seed)
    quota = sample_quotas(cluster_paths, sizes, sample_size, rng)
    # The selection reads every label file: in Ray tasks on a cluster, as level 1 ran.
    backend = level1.get("backend", {}).get("name", "ray")  # no name: a run from before
    with run_session(level1_config, backend):
        selection = cluster_selection(files, quota, strategy, config.seed, int(sizes.sum()))
    paths = cluster_paths[selection.column("label").to_numpy()]
    log.info(
        "curate: %d of %d ids selected, %s within clusters",
        len(selection),
        sizes.sum(),
        strategy,
    )

    output.root.join("selection").remove()
    for i, start in enumerate(range(0, len(selection), SELECTION_FILE_ROWS)):
        rows = slice(start, start + SELECTION_FILE_ROWS)
        columns = {"id": selection.column("id")[rows]}
        for level in range(paths.shape[1]):
            columns[f"level_{level + 1}"] = pa.array(paths[rows, level].astype(np.int32))
        _write_parquet(root.join("selection", f"part-{i:05d}.parquet"), pa.table(columns))
    for level, (c, parent) in enumerate(
        zip(tree.centroids, [*tree.parents, None], strict=True), start=1
    ):
        root.join("hierarchy", f"centroids-level-{level}.npy").write_bytes(npy_bytes(c))
        if parent is not None:
            root.join("hierarchy", f"parents-level-{level}.npy").write_bytes(npy_bytes(parent))

    manifest = {
        "format": 1,
        "command": "curate",
        "config": config.to_dict(),
        "levels": levels,
        "strategy": strategy,
        "resampling": {"steps": config.resampling_steps, "strategy": config.resample_strategy},
        "rows": {
            "input": int(sizes.sum()),
            "selected": len(selection),
            "requested": sample_size,
        },
        "balance": {
            f"level_{level + 1}": {
                "all": size_stats(
                    np.bincount(cluster_paths[:, level], weights=sizes, minlength=k).astype(
                        np.int64
                    )
                ),
                "selected": size_stats(np.bincount(paths[:, level], minlength=k)),
            }
            for level, k in enumerate(levels)
        },
        "level1_run": level1["timings"],
        "seconds": round(time.perf_counter() - t0, 3),
        "versions": versions(),
        "fingerprint": fingerprint,
    }
    output.commit(manifest)
    return manifest


def _write_parquet(loc: Location, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    loc.write_bytes(buf.getvalue())  # whole object: atomic locally, one PUT on S3


def summary(manifest: dict[str, Any], output: str) -> str:
    rows, top = manifest["rows"], f"level_{len(manifest['levels'])}"
    b = manifest["balance"][top]
    return "\n".join(
        [
            f"pseudolabel curate: levels {manifest['levels']}, {rows['selected']} of "
            f"{rows['input']} ids selected ({manifest['strategy']})",
            f"  output     {output}/selection",
            f"  top level  sizes max/min {b['all']['max_over_min']:.2f} in the data, "
            f"{b['selected']['max_over_min']:.2f} in the selection",
            f"  time       {manifest['seconds']:.1f} s",
        ]
    )
