import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from pseudolabel.ops.dataset import ArrayData
from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.ops.sinkhorn import (
    SAMPLE_NOISE_SHARE,
    RowBlock,
    epsilon_schedule,
    proportions,
    sample_tolerance,
    scores,
    sinkhorn,
)
from tests.data import long_tail_weights, mixture


def kmeans(x, k, seed=0):
    data = ArrayData(x)
    params = KMeansParams(k=k, iterations=20, seed=seed)
    return fit(data, params, init_state(data, params)[0]).centroids


def dense_reference(S, q, eps, iterations=20000, tol=1e-10):
    """Plain log-domain Sinkhorn in float64, one process, no tricks: the reference."""
    n, k = S.shape
    Z = S.astype(np.float64) / eps
    g = np.zeros(k)
    for _ in range(iterations):
        f = -np.log(n) - logsumexp(Z + g, axis=1)
        col = np.exp(logsumexp(Z + f[:, None], axis=0) + g)
        g = np.log(q) - logsumexp(Z + f[:, None], axis=0)
        if np.abs(col - q).sum() < tol:
            break
    return g * eps  # beta in score units


@pytest.fixture(scope="module")
def dominant():
    w = np.full(12, 0.5 / 11)
    w[0] = 0.5  # one mode holds half the data
    x, _ = mixture(12_000, 16, 12, seed=1, weights=w)
    return x, kmeans(x, 12)


def test_matches_dense_reference_and_meets_marginals(dominant):
    x, c = dominant
    x, k = x[:3000], 12
    S = scores(x, c, "l2")
    q = proportions(k)
    result = sinkhorn(RowBlock(x, c, "l2", len(x)), q, epsilon=0.05, tol=1e-7)
    assert result.converged and result.marginal_error < 1e-7
    ref = dense_reference(S, q, result.epsilon)
    ours = result.beta
    np.testing.assert_allclose(ours - ours.mean(), ref - ref.mean(), atol=1e-3 * result.epsilon)
    # The plan's marginals, recomputed densely from beta alone.
    Z = (S + ours[None, :]) / result.epsilon
    P = np.exp(Z - logsumexp(Z, axis=1, keepdims=True)) / len(x)
    assert np.abs(P.sum(0) - q).sum() < 1e-6
    np.testing.assert_allclose(P.sum(1), 1 / len(x))


def test_dominant_mode_is_balanced_within_ten_percent(dominant):
    x, c = dominant
    n, k = len(x), 12
    block = RowBlock(x, c, "l2", n)
    result = sinkhorn(block, proportions(k))
    assert result.converged and result.marginal_error < 1e-3
    balanced = np.bincount(block.labels(result.beta), minlength=k)
    nearest = np.bincount(block.labels(np.zeros(k)), minlength=k)
    assert np.abs(balanced / (n / k) - 1).max() <= 0.10
    assert np.abs(nearest / (n / k) - 1).max() > 0.10 * 10  # plain k-means is far off
    assert len(result.stages) == len(epsilon_schedule(1.0, 0.005))


def test_transport_cost_near_exact_balanced_assignment():
    x, _ = mixture(240, 4, 6, seed=3, weights=long_tail_weights(6))
    c = kmeans(x, 6)
    block = RowBlock(x, c, "l2", len(x))
    result = sinkhorn(block, proportions(6), tol=1e-6)
    labels = block.labels(result.beta)
    cost = ((x - c[labels]) ** 2).sum()
    # Exact: each centroid replicated n/k times, a square assignment problem.
    D = ((x[:, None, :] - np.repeat(c, 40, axis=0)[None]) ** 2).sum(-1)
    r, col = linear_sum_assignment(D)
    best = D[r, col].sum()
    assert cost <= 1.02 * best
    assert np.abs(np.bincount(labels, minlength=6) - 40).max() <= 4


def test_non_uniform_proportions(dominant):
    x, c = dominant
    n, k = len(x), 12
    q = proportions(k, np.arange(1, k + 1))
    block = RowBlock(x, c, "l2", n)
    result = sinkhorn(block, q)
    sizes = np.bincount(block.labels(result.beta), minlength=k)
    np.testing.assert_allclose(sizes / n, q, rtol=0.10)


def test_cached_and_recomputed_scores_agree(dominant):
    x, c = dominant
    a = sinkhorn(RowBlock(x, c, "l2", len(x), cache=True, chunk_rows=1000), proportions(12))
    b = sinkhorn(RowBlock(x, c, "l2", len(x), cache=False, chunk_rows=1000), proportions(12))
    assert a.iterations == b.iterations
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-6, atol=1e-6 * a.epsilon)


class Summed:
    """Several RowBlocks as one problem: the reduction over shards is a sum."""

    def __init__(self, blocks):
        self.blocks = blocks

    def score_moments(self):
        return sum(b.score_moments() for b in self.blocks)

    def prepare(self, beta, eps):
        for b in self.blocks:
            b.prepare(beta, eps)

    def column_sums(self, v):
        return sum(b.column_sums(v) for b in self.blocks)


def test_shards_equal_one_block(dominant):
    x, c = dominant
    one = RowBlock(x, c, "l2", len(x))
    four = Summed([RowBlock(p, c, "l2", len(x)) for p in np.array_split(x, 4)])
    a, b = sinkhorn(one, proportions(12)), sinkhorn(four, proportions(12))
    # log-duals are O(100) at eps = 0.005 x score std: equal to 1e-5 relatively.
    np.testing.assert_allclose(a.log_duals, b.log_duals, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(one.labels(a.beta), one.labels(b.beta))


def test_tiny_epsilon_stays_finite(dominant):
    x, c = dominant
    result = sinkhorn(
        RowBlock(x[:2000], c, "l2", 2000), proportions(12), epsilon=1e-4, max_iterations=3000
    )
    assert np.isfinite(result.beta).all() and np.isfinite(result.marginal_error)
    assert result.marginal_error < 0.05


def test_spherical_scores():
    x, _ = mixture(3000, 8, 5, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[:5]
    block = RowBlock(x, c, "ip", len(x))
    result = sinkhorn(block, proportions(5))
    sizes = np.bincount(block.labels(result.beta), minlength=5)
    assert np.abs(sizes / 600 - 1).max() <= 0.10


def test_blocked_column_sums_meet_the_float32_partial_sum_bound():
    """Each 16-row partial sum is a float32 dot product, then the partials add in float64.

    For non-negative terms a float32 sum of 16 products is off by at most
    gamma_16 = 16 u / (1 - 16 u) of its value (u = 2^-24; Higham, "Accuracy and Stability
    of Numerical Algorithms", 2002, section 3.1), and the float64 sum of the partials
    adds about 1e-16 more, so the relative error of every column is below 16 u (about
    1e-6, whatever the BLAS kernel or CPU). A plain float32 sum over all rows carries no
    such bound: its error grows with the row count.
    """
    from pseudolabel.ops.sinkhorn import blocked_column_sums

    rng = np.random.default_rng(0)
    K = rng.random((100_003, 7), dtype=np.float32)  # not a multiple of the block
    u = rng.random(100_003).astype(np.float32)
    exact = np.einsum("ij,i->j", K.astype(np.float64), u.astype(np.float64))
    u32 = 2.0**-24
    bound = 16 * u32 / (1 - 16 * u32) + 1e-12
    got = blocked_column_sums(K, u)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - exact) / exact) <= bound


def test_cached_kernel_chunks_fit_the_cache_in_whole_blocks():
    from pseudolabel.ops.sinkhorn import CACHE_BYTES, cached_chunk_rows

    for k in (2, 12, 1000, 3000, 10**6):
        rows = cached_chunk_rows(k)
        assert rows % 16 == 0 and rows >= 16
        assert rows * k * 4 <= CACHE_BYTES or rows == 16


@pytest.mark.parametrize("k, m, n", [(1000, 64_000, 1_000_000), (20, 2000, 4000), (50, 500, 10**5)])
def test_sample_tolerance_is_a_share_of_the_sample_error_it_predicts(k, m, n):
    """The L1 error with which a uniform sample of m of n rows estimates the cluster
    shares, as ``sample_tolerance`` predicts it, against 200 drawn samples (within 5%);
    Sinkhorn stops at SAMPLE_NOISE_SHARE of it, never below the asked tol, and at the
    asked tol on all rows."""
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.full(k, 5.0))
    labels = rng.choice(k, n, p=q)
    shares = np.bincount(labels, minlength=k) / n
    errors = [
        np.abs(np.bincount(labels[rng.choice(n, m, replace=False)], minlength=k) / m - shares).sum()
        for _ in range(200)
    ]
    predicted = sample_tolerance(0.0, shares, m, n) / SAMPLE_NOISE_SHARE
    assert predicted == pytest.approx(np.mean(errors), rel=0.05)
    assert sample_tolerance(1.0, shares, m, n) == 1.0
    assert sample_tolerance(1e-3, shares, n, n) == 1e-3
