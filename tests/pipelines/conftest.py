"""A real local Ray shared by the in-process pipeline tests (started once per session)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.demo import mixture, write_parquet_shards


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """6,000 rows x 16 dims from 12 components, in 5 parquet shards, with truth."""
    root = tmp_path_factory.mktemp("small") / "input"
    x, truth = mixture(6000, 16, 12, seed=3)
    write_parquet_shards(root, x, shards=5, truth=truth, row_group_rows=500)
    return root, x, truth


def fast_config(**kw):
    """Run settings sized for a 2-core test machine."""
    from pipelines.config import build

    defaults = dict(k=12, workers=2, cpus_per_worker=0.5, label_workers=1, iterations=10)
    return build(**{**defaults, **kw})


def nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
