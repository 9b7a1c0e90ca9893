import numpy as np

from pseudolabel.ops import drift


def test_permuted_centroids_match_exactly_and_no_label_changes():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((50, 8)).astype(np.float32)
    perm = rng.permutation(50)
    mapping, method = drift.match_centroids(c, c[perm] + 1e-3)
    assert method == "hungarian"
    np.testing.assert_array_equal(perm[mapping], np.arange(50))
    labels = rng.integers(0, 50, 1000)
    assert drift.changed_fraction(labels, mapping[labels], mapping) == 0.0
    shift = drift.centroid_shift(c, c[perm] + 1e-3, mapping)
    assert shift["max"] < 1e-2


def test_changed_fraction_counts_moves():
    mapping = np.array([1, 0, 2])
    prev = np.array([0, 0, 1, 2])
    cur = np.array([1, 2, 0, 2])  # row 1 moved
    assert drift.changed_fraction(prev, cur, mapping) == 0.25


def test_large_k_uses_nearest(monkeypatch):
    monkeypatch.setattr(drift, "HUNGARIAN_MAX_K", 10)
    c = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    mapping, method = drift.match_centroids(c, c)
    assert method == "nearest" and (mapping == np.arange(40)).all()
