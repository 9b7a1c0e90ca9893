"""Selections that do not depend on the split: merging the workers' candidates by keys
and row numbers picks exactly what one pass over all rows picks."""

import numpy as np
import pytest

from pseudolabel.ops.sampling import (
    below_thresholds,
    cluster_samples,
    cluster_thresholds,
    row_keys,
    smallest,
)


def test_row_keys_are_a_uniform_function_of_seed_and_row():
    rows = np.arange(200_000)
    keys = row_keys(rows, seed=3)
    np.testing.assert_array_equal(keys[[5, 99]], row_keys(np.array([5, 99]), seed=3))
    assert not np.array_equal(keys, row_keys(rows, seed=4))
    assert keys.min() >= 0 and keys.max() < 1
    counts = np.histogram(keys, bins=10, range=(0, 1))[0]
    # Each decile holds 20000 +- 5 standard deviations (sqrt(20000 * 0.9) = 134).
    assert np.abs(counts - 20_000).max() < 5 * 134


def test_smallest_breaks_ties_by_row_and_returns_row_order():
    keys = np.array([0.5, 0.1, 0.5, 0.1, 0.9])
    rows = np.array([40, 30, 20, 10, 0])
    assert smallest(keys, rows, 3).tolist() == [3, 2, 1]  # (0.1, 10), (0.1, 30), (0.5, 20)


@pytest.mark.parametrize("quota", [1, 7, 40])
def test_thresholds_from_split_candidates_select_what_one_pass_selects(quota):
    rng = np.random.default_rng(quota)
    n, k = 3000, 9
    labels = rng.integers(0, k, n)
    labels[labels == 8] = 7  # cluster 8 is empty
    keys = np.round(rng.random(n), 2)  # many ties: broken by row number
    rows = rng.permutation(n)
    expected = set(rows[cluster_samples(labels, keys, rows, k, quota)].tolist())
    parts = np.array_split(rng.permutation(n), 4)  # four workers
    candidates = [p[cluster_samples(labels[p], keys[p], rows[p], k, quota)] for p in parts]
    merged = np.concatenate(candidates)
    key_t, row_t = cluster_thresholds(labels[merged], keys[merged], rows[merged], k, quota)
    got = set()
    for p in parts:
        mask = below_thresholds(labels[p], keys[p], rows[p], key_t, row_t)
        got |= set(rows[p][mask].tolist())
    assert got == expected
    sizes = np.bincount(labels, minlength=k)
    assert len(got) == np.minimum(sizes, quota).sum()
