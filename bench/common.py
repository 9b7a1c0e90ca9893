"""Shared benchmark helpers: a cached dataset on disk, timers, result files.

Every benchmark measures its reference (faiss, scikit-learn, a plain loop) in the same
run on the same machine and prints ratios: single timings are noise on shared machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.data import mixture, write_parquet_shards

OUT = Path(__file__).parent / "out"
ROW_GROUP_ROWS = 16384  # rows per parquet row group in the cached shards


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
    """A Gaussian mixture as parquet shards under bench/out/, and its rows.

    The shards are written once and reused only while they hold exactly these rows: the
    marker ``_complete`` records the generation parameters and a sha256 of the rows. On
    reuse the rows regenerated from the seed must match the marker's digest and the
    shards, read back, must hold them in order (3-4 s at 1M x 128). Anything else (no
    marker, an older empty one, other rows, missing or extra files) rewrites the shards.
    """
    x, _ = mixture(n, d, components, seed=seed, spread=0.35, weights=weights)
    root = OUT / f"data-{n}x{d}-c{components}-s{seed}{tag}"
    marker = {"rows": n, "dim": d, "components": components, "seed": seed, "spread": 0.35}
    return _cached(root, marker, x, shards), x


def image_patches(size: int = 8, stride: int = 2, shards: int = 8) -> tuple[Path, np.ndarray]:
    """Real data: every ``size`` x ``size`` RGB patch, at ``stride``, of scikit-learn's
    two bundled photographs (``load_sample_images``: 427 x 640 each), pixels / 255, as
    parquet shards under bench/out/ and their rows. 8 x 8 at stride 2: 133,140 rows x
    192 dims, the k-means image features of Coates and Ng (AISTATS 2011) unwhitened."""
    from numpy.lib.stride_tricks import sliding_window_view
    from sklearn.datasets import load_sample_images

    patches = [
        sliding_window_view(image, (size, size, 3))[::stride, ::stride, 0].reshape(
            -1, size * size * 3
        )
        for image in load_sample_images().images
    ]
    x = (np.concatenate(patches).astype(np.float32) / 255).astype(np.float32)
    root = OUT / f"patches-{size}x{size}-stride{stride}"
    marker = {"rows": len(x), "dim": x.shape[1], "patch": size, "stride": stride}
    return _cached(root, marker, x, shards), x


def _cached(root: Path, marker: dict, x: np.ndarray, shards: int) -> Path:
    """``root`` holding ``x`` as parquet shards, written unless they hold exactly these
    rows already (``_stale``); ``marker`` says how ``x`` was made."""
    marker = {
        **marker,
        "shards": shards,
        "row_group_rows": ROW_GROUP_ROWS,
        "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
    }
    problem = _stale(root, marker, x)
    if problem is not None:
        if root.exists():
            print(f"rewriting {root.name}: {problem}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        write_parquet_shards(root, x, shards, row_group_rows=ROW_GROUP_ROWS)
        (root / "_complete").write_text(json.dumps(marker, indent=2))
    return root


def _stale(root: Path, marker: dict, x: np.ndarray) -> str | None:
    """Why the shards under ``root`` do not hold exactly ``x`` as ``marker`` says, or None."""
    try:
        recorded = json.loads((root / "_complete").read_text())
    except FileNotFoundError:
        return "no _complete marker"
    except json.JSONDecodeError:
        return "a marker of the older format, without a digest of the rows"
    if recorded != marker:
        changed = sorted(
            k for k in marker.keys() | recorded.keys() if recorded.get(k) != marker.get(k)
        )
        return f"the marker differs in {', '.join(changed)}"
    files = sorted(root.glob("part-*.parquet"))
    if len(files) != marker["shards"]:
        return f"{len(files)} shard files, not {marker['shards']}"
    start = 0
    for path in files:
        try:
            table = pq.read_table(path, columns=["id", "embedding"])
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            return f"{path.name} is unreadable ({e})"
        end = start + table.num_rows
        emb = table.column("embedding").combine_chunks()
        if emb.type.list_size != x.shape[1]:
            return f"{path.name} holds rows of dimension {emb.type.list_size}"
        rows = emb.flatten().to_numpy().reshape(-1, x.shape[1])
        ids = table.column("id").to_numpy()
        if not (np.array_equal(rows, x[start:end]) and np.array_equal(ids, np.arange(start, end))):
            return f"{path.name} does not hold rows {start}..{end - 1}"
        start = end
    if start != len(x):
        return f"the shards hold {start} rows, not {len(x)}"
    return None


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
