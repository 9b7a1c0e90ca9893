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


def test_epoch_batches_cover_every_row_once_and_do_not_depend_on_the_split():
    from pseudolabel.ops.sampling import epoch_batches

    rows = np.arange(10_000)
    whole = epoch_batches(rows, seed=3, epoch=1, batches=10)
    assert np.array_equal(np.sort(np.concatenate(whole)), rows)  # a partition
    assert all(np.all(np.diff(b) > 0) for b in whole)  # ascending positions
    assert all(abs(len(b) - 1000) < 150 for b in whole)  # about n / batches each
    # Three workers holding interleaved rows cut the same global batches.
    parts = [rows[i::3] for i in range(3)]
    for b in range(10):
        union = np.concatenate([p[epoch_batches(p, 3, 1, 10)[b]] for p in parts])
        assert np.array_equal(np.sort(union), whole[b])
    # Another epoch or seed, other batches.
    assert not np.array_equal(epoch_batches(rows, 3, 2, 10)[0], whole[0])
    assert not np.array_equal(epoch_batches(rows, 4, 1, 10)[0], whole[0])
