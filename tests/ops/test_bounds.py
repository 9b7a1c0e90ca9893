"""Hamerly's bounds (ops.bounds): the labels of an exact search, fewer rows searched."""

import itertools

import faiss
import numpy as np
import pytest

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import KMeansParams, KMeansState, fit, neighbour_graph
from tests.data import mixture


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_every_step_labels_rows_as_an_exact_search_and_skips_most_once_settled(metric):
    x, _ = mixture(20_000, 16, 40, seed=5, spread=0.4)
    if metric == "ip":
        x = normalize_rows(x)
    start = x[np.random.default_rng(0).choice(len(x), 64, replace=False)].copy()
    data = ArrayData(x, metric)
    params = KMeansParams(64, iterations=25, tol=0, seed=1, spherical=metric == "ip")
    searched, before = [], [start.copy()]
    index = faiss.IndexFlatIP(16) if metric == "ip" else faiss.IndexFlatL2(16)

    def check(state, record):
        index.reset()
        index.add(before[-1])
        D, I = index.search(x, 2)
        wrong = np.flatnonzero(I[:, 0] != data.labels)
        # Only float32 ties may differ: two centroids as close as rounding.
        assert np.all(np.abs(D[wrong, 0] - D[wrong, 1]) < 1e-4 * np.abs(D[wrong, 0]) + 1e-6)
        own = ((x - before[-1][data.labels]) ** 2).sum(axis=1, dtype=np.float64)
        assert record.inertia == pytest.approx(own.sum(), rel=1e-5)
        searched.append(data.bounds.searched)
        before.append(state.centroids.copy())

    state = fit(data, params, KMeansState(start.copy()), check)
    assert state.iteration == 25  # tol 0: no rounding stops it early
    assert searched[0] == len(x)  # labels still move: every row searched
    assert min(searched) < 0.5 * len(x), searched  # settled: most rows skipped


def test_a_settled_fit_with_tol_zero_runs_every_iteration():
    """Inertia found by a search and by the bounds' direct distance round apart; the
    loop reads such a change as none, so tol = 0 still runs to the end."""
    x, _ = mixture(5000, 8, 6, seed=2)
    data = ArrayData(x)
    state = fit(data, KMeansParams(6, iterations=30, tol=0, seed=3), KMeansState(x[:6].copy()))
    assert state.iteration == 30 and not state.converged
    inertias = [r.inertia for r in state.history]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(inertias))
    assert data.bounds.searched < len(x)  # the last steps kept most rows


def test_an_approximate_step_voids_the_bounds():
    x, _ = mixture(5000, 8, 20, seed=4)
    data = ArrayData(x)
    c = x[:40].copy()
    for _ in range(4):  # the same centroids: labels, no change, bounds set, used
        data.partial_stats(c)
    assert data.bounds.usable(c) and data.bounds.searched < len(x)
    data.partial_stats(c, neighbour_graph(c))  # moves labels the bounds do not follow
    assert not data.bounds.usable(c) and not data.bounds.engaged
    data.partial_stats(c)
    assert data.bounds.searched == len(x)  # searched afresh


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_fits_bounds_label_its_final_centroids_as_a_search_does(metric):
    """After a fit, ``bounded_search`` against the final centroids (a label pass on the
    fit's rows) finds every row's nearest centroid, searching few rows, and reports its
    squared distance; the fit's bounds are left as they were (searched on a copy)."""
    from pseudolabel.ops.assign import CentroidIndex
    from pseudolabel.ops.bounds import bounded_search

    x, _ = mixture(20_000, 16, 40, seed=6, spread=0.4)
    if metric == "ip":
        x = normalize_rows(x)
    data = ArrayData(x, metric)
    params = KMeansParams(64, iterations=15, tol=0, seed=2, spherical=metric == "ip")
    start = x[np.random.default_rng(1).choice(len(x), 64, replace=False)].copy()
    final = fit(data, params, KMeansState(start)).centroids
    assert data.bounds.usable(final)  # the last step kept them
    kept = data.bounds.labels.copy(), data.bounds.lower.copy()
    searched = data.bounds.copy()
    distances = bounded_search(x, CentroidIndex(final, metric), searched)
    assert searched.searched < 0.5 * len(x)
    np.testing.assert_array_equal(data.bounds.labels, kept[0])
    np.testing.assert_array_equal(data.bounds.lower, kept[1])
    index = faiss.IndexFlatIP(16) if metric == "ip" else faiss.IndexFlatL2(16)
    index.add(final)
    D, I = index.search(x, 2)
    wrong = np.flatnonzero(I[:, 0] != searched.labels)
    assert np.all(np.abs(D[wrong, 0] - D[wrong, 1]) < 1e-4 * np.abs(D[wrong, 0]) + 1e-6)
    own = ((x - final[searched.labels]) ** 2).sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(distances, own, rtol=1e-4, atol=1e-5)
