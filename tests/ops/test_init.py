import numpy as np
import pytest

from pseudolabel.ops.init import init_sample_size, kmeans_plusplus, random_init, resolve_init


def test_kmeanspp_picks_distinct_rows_and_spreads():
    rng = np.random.default_rng(0)
    # Four tight, far-apart blobs: D^2 seeding puts one centre in each nearly always.
    blobs = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], np.float32)
    x = np.repeat(blobs, 250, axis=0) + rng.standard_normal((1000, 2)).astype(np.float32)
    hits = 0
    for seed in range(20):
        c = kmeans_plusplus(x, 4, np.random.default_rng(seed))
        assert c.shape == (4, 2) and c.dtype == np.float32
        hits += len({tuple(np.round(ci / 100)) for ci in c}) == 4
    assert hits >= 19


def test_kmeanspp_on_identical_points_returns_k_rows():
    x = np.ones((50, 3), np.float32)
    c = kmeans_plusplus(x, 10, np.random.default_rng(0))
    assert c.shape == (10, 3)


def test_random_init_distinct_rows():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    c = random_init(x, 20, np.random.default_rng(0))
    assert len(np.unique(c[:, 0])) == 20


def test_resolve_init():
    assert resolve_init("auto", 10) == "kmeans++"
    assert resolve_init("auto", 100_000) == "random"
    assert init_sample_size("random", 8, 1000, 16) == 8
    assert init_sample_size("kmeans++", 8, 100, 16) == 100
    # small k: the work budget of rows x centroids x dims, whatever the shape
    assert init_sample_size("kmeans++", 32, 10**9, 64) == 2**22 * 192 // (32 * 64)
    assert init_sample_size("kmeans++", 8, 10**9, 2) == 2**22 * 192 // (8 * 64)  # O(rows)
    assert init_sample_size("kmeans++", 256, 10**9, 192) == 2**14
    assert init_sample_size("kmeans++", 2048, 10**9, 128) == 16 * 2048  # 16 per centroid
    with pytest.raises(ValueError):
        resolve_init("bogus", 3)
