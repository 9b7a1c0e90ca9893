"""The approximate nearest-centroid search (ops.neighbours) against faiss's exact one."""

import itertools
import pickle

import faiss
import numpy as np
import pytest

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.balanced import BalancedAssigner
from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import (
    APPROX_FROM_K,
    KMeansParams,
    fit,
    init_state,
    neighbour_graph,
    resolve_search,
)
from pseudolabel.ops.neighbours import cell_count, graph_from_cells
from pseudolabel.ops.stats import partial_stats
from tests.data import mixture


@pytest.fixture(scope="module")
def problem():
    """20k rows of 64 modes, 1024 centroids drawn from the rows (16 per mode)."""
    x, _ = mixture(20_000, 16, 64, seed=3, spread=0.4)
    c = x[np.random.default_rng(4).choice(len(x), 1024, replace=False)].copy()
    return x, c


def exact(x, c, m=1):
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(c)
    return index.search(x, m)


def test_every_cell_holds_its_members_and_every_centroid_is_in_one(problem):
    _, c = problem
    g = neighbour_graph(c)
    assert g.cells <= cell_count(len(c)) and len(g.cell_of) == len(c)
    for cell in range(g.cells):
        cand = g.candidates[g.offsets[cell] : g.offsets[cell + 1]]
        members = np.flatnonzero(g.cell_of == cell)
        assert members.size and np.isin(members, cand).all()  # no empty cell is kept
        assert np.all(np.diff(cand) > 0)  # sorted, no repeats


def test_a_row_never_ends_farther_than_its_previous_centroid(problem):
    """The invariant that keeps Lloyd's objective decreasing, from any previous labels,
    even random ones; from the exact labels of slightly moved centroids the search finds
    the exact nearest centroid of nearly every row."""
    x, c = problem
    g = neighbour_graph(c)
    previous = np.random.default_rng(0).integers(0, len(c), len(x))
    D, I = g.search(x, 1, previous)
    to_previous = ((x - c[previous]) ** 2).sum(axis=1)
    assert np.all(D[:, 0] <= to_previous * (1 + 1e-5) + 1e-5)

    moved = c + 0.05 * np.random.default_rng(1).standard_normal(c.shape).astype(np.float32)
    _, before = exact(x, c)
    De, Ie = exact(x, moved)
    # Built afresh, and as the loop builds it: from the cells of the previous graph.
    for graph in (neighbour_graph(moved), neighbour_graph(moved, previous=g)):
        D, I = graph.search(x, 1, before[:, 0])
        assert (I[:, 0] == Ie[:, 0]).mean() > 0.995
        assert D.sum() <= De.sum() * 1.0005


def test_a_warm_graph_keeps_its_cell_count_when_cells_were_dropped(problem):
    _, c = problem
    g = neighbour_graph(c)
    fewer = graph_from_cells(c, g.cell_centres[: g.cells // 2])  # as if half were empty
    warm = neighbour_graph(c, previous=fewer)
    assert fewer.cells < warm.cells <= cell_count(len(c))
    assert warm.cells >= 0.9 * cell_count(len(c))  # refilled from the centroids


def test_new_rows_top_m_close_to_exact(problem):
    """Rows with no previous label start from the inverted file; top-5 is ranked."""
    x, c = problem
    D, I = neighbour_graph(c).search(x, 5)
    De, Ie = exact(x, c, 5)
    assert (I[:, 0] == Ie[:, 0]).mean() > 0.98
    assert D[:, 0].sum() <= De[:, 0].sum() * 1.01
    assert np.all(np.diff(D, axis=1) >= 0)  # best first
    np.testing.assert_allclose(D, ((x[:, None, :] - c[I]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)


def test_fewer_candidates_than_m_pad_like_faiss():
    """Three far-apart pairs of centroids, a cell each, one cell probed for neighbours: a
    cell offers 2 candidates, so of m = 4 the last two slots are padded."""
    centres = np.eye(3, dtype=np.float32) * 100
    c = np.repeat(centres, 2, axis=0)
    c[1::2] += 1
    x = c + 0.1
    D, I = graph_from_cells(c, centres, neighbours=2, probes=1).search(x, 4)
    assert np.array_equal(I[:, 0], np.arange(6))
    assert np.all(I[:, 2:] == -1) and np.all(np.isinf(D[:, 2:]))


def test_spherical_search_matches_inner_products(problem):
    x, c = problem
    x, c = normalize_rows(x), normalize_rows(c)
    D, I = neighbour_graph(c, "ip").search(x, 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(c)
    _, Ie = index.search(x, 1)
    assert (I[:, 0] == Ie[:, 0]).mean() > 0.98
    np.testing.assert_allclose(D[:, 0], (x * c[I[:, 0]]).sum(1), rtol=1e-5, atol=1e-5)


def test_approx_fit_reaches_the_exact_objective_and_counts_changes():
    x, _ = mixture(30_000, 16, 128, seed=5, spread=0.4)
    results = {}
    for search in ("flat", "approx"):
        data = ArrayData(x)
        params = KMeansParams(1024, iterations=6, tol=0, seed=2, search=search)
        state, _ = init_state(data, params)
        results[search] = fit(data, params, state)
        assert (data.labels >= 0).all()  # the data keeps each row's last label
    flat, approx = results["flat"], results["approx"]
    assert approx.history[-1].inertia <= flat.history[-1].inertia * 1.001
    assert approx.history[0].changed is None  # no previous labels to compare with
    changed = [r.changed for r in approx.history[1:]]
    assert all(c > 0 for c in changed) and changed[-1] < changed[0]
    inertia = [r.inertia for r in approx.history]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(inertia))


def test_labels_of_partial_stats_follow_each_step(problem):
    x, c = problem
    labels = np.full(len(x), -1, np.int32)
    from pseudolabel.ops.assign import CentroidIndex

    first = partial_stats(x, CentroidIndex(c), labels=labels)
    assert first.compared == 0 and np.array_equal(labels, exact(x, c)[1][:, 0])
    again = partial_stats(x, CentroidIndex(c[::-1].copy()), labels=labels)
    assert again.compared == len(x) and again.changed > len(x) * 0.9  # ids reversed


def test_the_graph_travels_without_its_faiss_index(problem):
    x, c = problem
    g = neighbour_graph(c)
    before = g.search(x[:100], 3)
    copy = pickle.loads(pickle.dumps(g))
    assert copy._ivf is None
    after = copy.search(x[:100], 3)
    assert np.array_equal(before[1], after[1])


def test_assigner_uses_the_graph_for_nearest_labels_only(problem):
    x, c = problem
    approx = BalancedAssigner(c, "l2", search="approx")
    assert approx.index.cells > 1  # the graph, not faiss's flat index
    _, Ie = exact(x, c)
    assert (approx.assign(x).label == Ie[:, 0]).mean() > 0.98
    balanced = BalancedAssigner(c, "l2", beta=np.zeros(len(c)), search="approx")
    assert np.array_equal(balanced.assign(x).label, Ie[:, 0])  # exact with every score


def test_search_settings():
    assert resolve_search("auto", APPROX_FROM_K - 1) == "flat"
    assert resolve_search("auto", APPROX_FROM_K) == "approx"
    assert resolve_search("auto", APPROX_FROM_K, "minibatch") == "flat"
    assert KMeansParams(8, search="flat").resolved_search == "flat"
    with pytest.raises(ValueError, match="approx' needs algorithm 'lloyd'"):
        KMeansParams(8, algorithm="minibatch", search="approx")
    with pytest.raises(ValueError, match="search must be one of"):
        KMeansParams(8, search="ivf")
