"""``pseudolabel demo``: write a small sharded long-tailed mixture with ground truth, run
the job on an embedded local Ray with balanced labels, and print the summary (sizes and
NMI against the truth, for the balanced and the nearest-centroid labels)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.commands.summary import text_summary
from pseudolabel.pipelines.config import build

log = logging.getLogger("pseudolabel")

SPREAD = 0.3  # within-component standard deviation; the means are N(0, I)


def write_demo_input(root: Path, rows: int, dim: int, components: int, shards: int) -> None:
    """``shards`` parquet files of id, embedding and truth: a Gaussian mixture whose
    component weights fall off as 1/sqrt(j + 1), so nearest-centroid clusters differ in
    size by an order of magnitude."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((components, dim)).astype(np.float32)
    weights = 1.0 / np.sqrt(np.arange(1, components + 1))
    truth = rng.choice(components, size=rows, p=weights / weights.sum())
    x = means[truth] + SPREAD * rng.standard_normal((rows, dim), dtype=np.float32)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.parquet"):
        old.unlink()
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        table = pa.table(
            {
                "id": pa.array(part.astype(np.int64)),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), dim),
                "truth": pa.array(truth[part].astype(np.int32)),
            }
        )
        pq.write_table(table, root / f"part-{i:05d}.parquet", row_group_size=8192)


def run_demo(
    directory: str,
    rows: int = 100_000,
    dim: int = 64,
    k: int = 32,
    shards: int = 8,
    workers: int | None = None,
) -> dict:
    root = Path(directory).resolve()
    write_demo_input(root / "input", rows, dim, k, shards)
    log.info(
        "demo: wrote %d rows x %d dims in %d parquet shards to %s/input", rows, dim, shards, root
    )
    config = build(
        input=str(root / "input"),
        output=str(root / "run"),
        k=k,
        truth_column="truth",
        workers=workers,
        overwrite=True,
        balanced=True,
        topk=3,
    )
    manifest = run(config)
    print(text_summary(manifest, config.output), flush=True)
    return manifest
