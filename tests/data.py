"""Test data: Gaussian mixtures with ground truth, written as sharded parquet files.

Shared by the tests and the benchmarks; the demo writes its own input
(``pipelines.commands.demo``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def mixture(
    n: int,
    d: int,
    components: int,
    seed: int = 0,
    spread: float = 0.3,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """x (n, d) float32 around ``components`` N(0, I) means; returns (x, truth)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((components, d)).astype(np.float32)
    truth = rng.choice(components, size=n, p=weights)
    x = means[truth] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return x.astype(np.float32), truth


def long_tail_weights(components: int, exponent: float = 1.0) -> np.ndarray:
    """Zipf-like component weights p_j ~ 1 / (j + 1)^exponent."""
    w = 1.0 / np.arange(1, components + 1) ** exponent
    return w / w.sum()


def write_parquet_shards(
    root: Path,
    x: np.ndarray,
    shards: int,
    truth: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    row_group_rows: int = 8192,
) -> list[Path]:
    """Write x as ``shards`` parquet files: id (int64), embedding fixed_size_list<float>."""
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(x), dtype=np.int64) if ids is None else ids
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(len(x)), shards)):
        flat = pa.array(np.ascontiguousarray(x[rows]).ravel())
        columns = {
            "id": pa.array(ids[rows]),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
        }
        if truth is not None:
            columns["truth"] = pa.array(truth[rows].astype(np.int32))
        path = root / f"part-{i:05d}.parquet"
        pq.write_table(pa.table(columns), path, row_group_size=row_group_rows)
        paths.append(path)
    return paths
