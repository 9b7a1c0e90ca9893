import itertools

import faiss
import numpy as np
import pytest

from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import (
    KMeansParams,
    KMeansState,
    fit,
    init_state,
    minibatch_update,
    split_empty_clusters,
)
from pseudolabel.ops.stats import PartialStats
from tests.data import mixture


def faiss_kmeans(x, k, niter, init=None, spherical=False, seed=1):
    # Subsampling off: faiss.Kmeans would otherwise use only k * 256 points.
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        max_points_per_centroid=len(x),
    )
    km.train(x, init_centroids=init)
    return km


def run(x, **kw):
    params = KMeansParams(**kw)
    data = ArrayData(x, "ip" if params.spherical else "l2")
    state, _ = init_state(data, params)
    return fit(data, params, state), state


def test_lloyd_matches_faiss_from_same_init(mixture_data):
    x, _ = mixture_data
    params = KMeansParams(k=64, iterations=8, tol=0, init="random", seed=3)
    data = ArrayData(x)
    state, _ = init_state(data, params)
    km = faiss_kmeans(x, 64, 8, init=state.centroids.copy())
    state = fit(data, params, state)
    ours = [r.inertia for r in state.history]
    # Same objective at every iteration, to float rounding.
    np.testing.assert_allclose(ours, km.obj, rtol=1e-3)
    np.testing.assert_allclose(state.centroids, km.centroids, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_lloyd_objective_within_one_percent_of_faiss(mixture_data, seed):
    x, _ = mixture_data
    state, _ = run(x, k=64, iterations=15, tol=0, seed=seed)
    km = faiss_kmeans(x, 64, 15, seed=seed)
    D, _ = faiss.knn(x, state.centroids, 1)
    D_ref, _ = faiss.knn(x, km.centroids, 1)
    assert D.sum() <= 1.01 * D_ref.sum()


def test_empty_clusters_are_split_and_centroids_distinct():
    # faiss's test_redo-style trap: most points are copies of one point, so seeding and
    # assignment collapse clusters onto it and the split path must run.
    rng = np.random.default_rng(0)
    x = np.vstack([np.tile([[1.0, 2.0, 3.0, 4.0]], (2000, 1)), rng.standard_normal((20, 4))])
    params = KMeansParams(k=16, iterations=5, tol=0, init="random", seed=0)
    data = ArrayData(x.astype(np.float32))
    state, _ = init_state(data, params)
    state.centroids[:] = x[0]  # every centroid on the repeated point
    state = fit(data, params, state)
    assert sum(r.n_split for r in state.history) >= 15
    assert len(np.unique(state.centroids, axis=0)) == 16


def test_split_moves_a_zero_centroid_too():
    c = np.zeros((3, 4), np.float32)
    counts = np.array([10, 0, 0])
    n = split_empty_clusters(c, counts, np.random.default_rng(0))
    assert n == 2 and len(np.unique(c, axis=0)) == 3
    assert counts.sum() == 10 and (counts > 0).all()


def test_split_gives_up_when_nothing_to_split():
    c = np.eye(3, dtype=np.float32)
    counts = np.array([1, 0, 1])
    assert split_empty_clusters(c, counts, np.random.default_rng(0)) == 0


def test_same_seed_same_centroids(mixture_data):
    x, _ = mixture_data
    a, _ = run(x, k=32, iterations=4, seed=7)
    b, _ = run(x, k=32, iterations=4, seed=7)
    c, _ = run(x, k=32, iterations=4, seed=8)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)


def test_tolerance_stops_early(mixture_data):
    x, _ = mixture_data
    state, _ = run(x, k=8, iterations=200, tol=1e-3, seed=0)
    assert state.converged and state.iteration < 200
    assert state.history[-1].rel_change < 1e-3


def test_resume_equals_uninterrupted(mixture_data):
    x, _ = mixture_data
    params = KMeansParams(k=16, iterations=6, tol=0, seed=2)
    data = ArrayData(x)
    full = fit(data, params, init_state(data, params)[0])
    first = fit(data, KMeansParams(k=16, iterations=3, tol=0, seed=2), init_state(data, params)[0])
    resumed = KMeansState(first.centroids.copy(), first.iteration, history=list(first.history))
    resumed = fit(data, params, resumed)
    np.testing.assert_array_equal(resumed.centroids, full.centroids)


def test_minibatch_step_is_sculley_update():
    c = np.array([[0.0, 0.0], [10.0, 10.0]], np.float32)
    w = np.array([3.0, 0.0])
    stats = PartialStats(np.array([[2.0, 4.0], [0.0, 0.0]]), np.array([1, 0]), 0.0)
    minibatch_update(c, w, stats, spherical=False)
    # w0: 3 -> 4; c0 += (s0 - b0 c0) / w0 = [2, 4] / 4.
    np.testing.assert_allclose(c, [[0.5, 1.0], [10.0, 10.0]])
    np.testing.assert_array_equal(w, [4.0, 0.0])


def test_minibatch_close_to_lloyd():
    x, _ = mixture(40_000, 16, 30, seed=4)
    lloyd, _ = run(x, k=30, iterations=20, seed=0)
    params = KMeansParams(k=30, algorithm="minibatch", iterations=3, seed=0, tol=0)
    data = ArrayData(x, batch_rows=2048, seed=0)
    state = fit(data, params, init_state(data, params)[0])
    assert state.history[-1].steps == 20
    final = ArrayData(x).partial_stats(state.centroids).inertia
    reference = ArrayData(x).partial_stats(lloyd.centroids).inertia
    assert final <= 1.02 * reference


def test_minibatch_needs_streaming_data(mixture_data):
    class OnlyLloyd:
        def __init__(self, x):
            self.inner = ArrayData(x)

        def __getattr__(self, name):
            if name in ("start_epoch", "next_batch_stats"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    params = KMeansParams(k=4, algorithm="minibatch")
    data = OnlyLloyd(mixture_data[0])
    with pytest.raises(TypeError, match="mini-batch"):
        fit(data, params, KMeansState(mixture_data[0][:4].copy(), weight_sums=np.zeros(4)))


def test_spherical_matches_faiss_spherical():
    x, _ = mixture(20_000, 16, 20, seed=5)
    state, _ = run(x, k=20, iterations=10, tol=0, spherical=True, seed=1)
    np.testing.assert_allclose(np.linalg.norm(state.centroids, axis=1), 1.0, rtol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = faiss_kmeans(xn, 20, 10, spherical=True)
    ours = faiss.knn(xn, state.centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].sum()
    ref = faiss.knn(xn, km.centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].sum()
    assert ours >= 0.99 * ref  # similarity: larger is better


@pytest.mark.parametrize("workers", [1, 3, 19])
def test_reduce_scatter_gives_the_gathers_bits(workers):
    """Each worker's statistics split into W slices, slice j of all of them reduced on
    "worker j" and joined, give the update that the summed whole gives: the same bits,
    empty-cluster splits included (19 workers: the tree's grouping, 8 + 8 + 3)."""
    from pseudolabel.ops.kmeans import lloyd_update, reduce_slice, rng_for
    from pseudolabel.ops.stats import join_slices, reduce_stats, slice_bounds, tree_sum

    rng = np.random.default_rng(workers)
    k, d = 10, 5
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    parts = []
    for i in range(workers):
        counts = rng.integers(0, 30, k)
        counts[[2, 7]] = 0  # empty in every worker: split after the reduction
        sums = rng.standard_normal((k, d)) * counts[:, None]
        parts.append(PartialStats(sums, counts, float(rng.random()), i, 2 * i))
    whole = tree_sum(parts, reduce_stats)
    bounds = slice_bounds(k, workers)
    pieces = [p.split(bounds) for p in parts]
    reduced = [reduce_slice(centroids[lo:hi], [pc[j] for pc in pieces])
               for j, (lo, hi) in enumerate(bounds)]  # fmt: skip
    joined = join_slices([s for _, s in reduced], np.concatenate([m for m, _ in reduced]))
    assert joined.sums is None and all(s.sums is None and s.means is None for _, s in reduced)
    np.testing.assert_array_equal(joined.counts, whole.counts)
    assert (joined.inertia, joined.changed, joined.compared) == (
        whole.inertia, whole.changed, whole.compared
    )  # fmt: skip
    gathered, n1 = lloyd_update(centroids, whole, rng_for(0, 1, 0), spherical=False)
    scattered, n2 = lloyd_update(centroids, joined, rng_for(0, 1, 0), spherical=False)
    assert n1 == n2 == 2
    np.testing.assert_array_equal(scattered, gathered)


class HeldArray:
    """``ops.kmeans.HeldCentroids`` over an array here, counting what is fetched."""

    fetches = 0

    def __init__(self, x, fns=()):
        self.x, self.fns = x, fns

    def __len__(self):
        return len(self.x)

    def fetch(self):
        HeldArray.fetches += 1
        x = self.x
        for fn in self.fns:
            x = fn(x)
        return x

    def map_rows(self, fn):
        return HeldArray(self.x, (*self.fns, fn))

    def derive(self, fn, *args):
        before = HeldArray.fetches
        value = fn(self.fetch(), *(a.fetch() if isinstance(a, Derived) else a for a in args))
        HeldArray.fetches = before  # where they are held, not on the driver
        return Derived(value)


class Derived:
    """A value derived beside held centroids: the data takes it back, ``fetch`` here."""

    def __init__(self, value):
        self.value = value

    def fetch(self):
        return self.value


class EmptyingData(ArrayData):
    """ArrayData whose ``empty_at``-th step finds cluster 0 empty: a split mid-fit."""

    def __init__(self, x, empty_at):
        super().__init__(x)
        self.steps, self.empty_at = 0, empty_at

    def partial_stats(self, centroids, near=None):
        stats = super().partial_stats(centroids, near)
        self.steps += 1
        if self.steps == self.empty_at:
            stats.counts[0], stats.sums[0] = 0, 0.0
        return stats


class HoldingData(EmptyingData):
    """Data whose steps return their means held (as a reduce-scatter's workers do)."""

    def partial_stats(self, centroids, near=None):
        from pseudolabel.ops.kmeans import cluster_means, fetched

        before = HeldArray.fetches
        c = fetched(centroids)
        HeldArray.fetches = before  # the workers' fetch, not the driver's
        if isinstance(near, Derived):
            near = near.value
        stats = super().partial_stats(c, near)
        stats.means = HeldArray(cluster_means(c, stats.sums, stats.counts))
        stats.sums = None
        return stats


@pytest.mark.parametrize(("spherical", "search"), [(False, "flat"), (True, "flat"),
                                                   (False, "approx")])  # fmt: skip
def test_held_means_stay_held_until_a_split_or_the_end(spherical, search):
    """The one loop over data whose means stay on its workers: the same bits as over an
    array, and the driver fetches the centroids only for the iterations that split a
    cluster (the first, and the fifth), and once at the end. The approximate search's
    graph is built beside held centroids, and from the one built there after a split."""
    x, _ = mixture(3000, 6, 8, seed=3)
    params = KMeansParams(
        k=40, iterations=8, tol=-np.inf, seed=2, spherical=spherical, search=search
    )  # fmt: skip  (every iteration runs)
    start = init_state(ArrayData(x), params)[0].centroids
    start[:3] = -start[:3] if spherical else 1e3  # far from every row: split at once
    plain = fit(EmptyingData(x, empty_at=5), params, KMeansState(start.copy()))
    HeldArray.fetches = 0
    held = fit(HoldingData(x, empty_at=5), params, KMeansState(start.copy()))
    np.testing.assert_array_equal(held.centroids, plain.centroids)
    assert [r.inertia for r in held.history] == [r.inertia for r in plain.history]
    splits = [r.iteration for r in held.history if r.n_split > 0]
    assert splits == [1, 5]
    assert HeldArray.fetches == len(splits) + 1


def test_slice_bounds_cover_k_in_near_equal_slices():
    from pseudolabel.ops.stats import slice_bounds

    bounds = slice_bounds(10, 4)
    assert bounds[0][0] == 0 and bounds[-1][1] == 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert {hi - lo for lo, hi in bounds} <= {2, 3}
    assert sum(hi - lo for lo, hi in slice_bounds(3, 5)) == 3  # more workers than centres


def test_tree_sum_groups_by_the_fan_in():
    from pseudolabel.ops.stats import tree_sum

    def add(group):
        return "(" + "+".join(group) + ")"

    assert tree_sum(list("abc"), add, fan_in=2) == "((a+b)+(c))"
    assert (
        tree_sum(list("abcde"), add, last=lambda g: "+".join(g), fan_in=2) == "((a+b)+(c+d))+((e))"
    )
