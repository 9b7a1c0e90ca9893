"""Shared benchmark helpers: a cached dataset on disk, timers, result files.

Every benchmark measures its reference (faiss, scikit-learn, a plain loop) in the same
run on the same machine and prints ratios: single timings are noise on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tests.data import mixture, write_parquet_shards

OUT = Path(__file__).parent / "out"


def size_parser(
    rows: int = 1_000_000, dim: int = 128, k: int | None = 1024
) -> argparse.ArgumentParser:
    """An argument parser with --rows, --dim and (unless k is None) --k, at these defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=rows)
    p.add_argument("--dim", type=int, default=dim)
    if k is not None:
        p.add_argument("--k", type=int, default=k)
    return p


def dataset(
    n: int = 1_000_000,
    d: int = 128,
    components: int = 2000,
    shards: int = 16,
    seed: int = 0,
    weights: np.ndarray | None = None,
    tag: str = "",
) -> tuple[Path, np.ndarray]:
    """A Gaussian mixture as parquet shards under bench/out/ (written once), and its rows."""
    x, _ = mixture(n, d, components, seed=seed, spread=0.35, weights=weights)
    root = OUT / f"data-{n}x{d}-c{components}-s{seed}{tag}"
    if not (root / "_complete").exists():
        write_parquet_shards(root, x, shards, row_group_rows=16384)
        (root / "_complete").write_text("")
    return root, x


@contextmanager
def timer(results: dict, name: str):
    t0 = time.perf_counter()
    yield
    results[name] = time.perf_counter() - t0


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    D, _ = faiss.knn(x, np.ascontiguousarray(centroids, np.float32), 1)
    return float(D.sum(dtype=np.float64))


def save(name: str, results: dict) -> Path:
    OUT.mkdir(exist_ok=True)
    results = {**results, "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def start_ray(num_cpus: int | None = None) -> float:
    """Start an embedded Ray and return the seconds it took (excluded from fit times)."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    return time.perf_counter() - t0
