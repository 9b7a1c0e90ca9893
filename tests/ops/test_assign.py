import numpy as np
import pytest

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.scores import sq_distances_from_search
from pseudolabel.ops.stats import PartialStats, partial_stats, reduce_stats


def brute_force(x, c, metric):
    x = x.astype(np.float64)
    c = c.astype(np.float64)
    return -((x[:, None, :] - c[None]) ** 2).sum(-1) if metric == "l2" else x @ c.T


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_search_matches_brute_force(metric, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 12)).astype(dtype)
    c = rng.standard_normal((37, 12)).astype(np.float32)
    if metric == "ip":
        x, c = normalize_rows(x).astype(dtype), normalize_rows(c)
    D, I = CentroidIndex(c, metric).search(x, m=3, chunk_rows=128)  # chunk edges inside
    scores = brute_force(x.astype(np.float32), c, metric)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    assert (I[:, 0] == expected[:, 0]).mean() > 0.999
    best = scores[np.arange(len(x)), I[:, 0]]
    np.testing.assert_allclose(D[:, 0], -best if metric == "l2" else best, rtol=1e-4, atol=1e-4)


def test_squared_distances_agree_between_metrics():
    rng = np.random.default_rng(1)
    x = normalize_rows(rng.standard_normal((200, 8)))
    c = normalize_rows(rng.standard_normal((5, 8)))
    D2, I2 = CentroidIndex(c, "l2").search(x)
    Dip, Iip = CentroidIndex(c, "ip").search(x)
    np.testing.assert_array_equal(I2, Iip)
    np.testing.assert_allclose(sq_distances_from_search(Dip, "ip"), D2, atol=1e-5)


def test_partial_stats_against_numpy():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((30_000, 6)) + 1000).astype(np.float32)  # large offset
    c = x[:9].copy()
    stats = partial_stats(x, CentroidIndex(c), chunk_rows=7000)
    D, I = CentroidIndex(c).search(x, chunk_rows=7000)  # same BLAS blocking, same ties
    labels = I[:, 0]
    expected = np.zeros((9, 6))
    np.add.at(expected, labels, x.astype(np.float64))
    assert stats.sums.dtype == np.float64
    np.testing.assert_allclose(stats.sums, expected, rtol=1e-12)  # float64 all the way
    np.testing.assert_array_equal(stats.counts, np.bincount(labels, minlength=9))
    assert stats.n == len(x)
    np.testing.assert_allclose(stats.inertia, D.sum(dtype=np.float64), rtol=1e-6)


def test_reduce_is_sum_of_shards():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5000, 4)).astype(np.float32)
    index = CentroidIndex(x[:7])
    whole = partial_stats(x, index)
    parts = [partial_stats(s, index) for s in np.array_split(x, 4)]
    total = reduce_stats(parts)
    np.testing.assert_allclose(total.sums, whole.sums, rtol=1e-12)
    np.testing.assert_array_equal(total.counts, whole.counts)
    assert total.inertia == pytest.approx(whole.inertia, rel=1e-9)
    assert (parts[0] + PartialStats.zeros(7, 4)).n == parts[0].n
    with pytest.raises(ValueError):
        reduce_stats([])
