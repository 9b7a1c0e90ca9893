import numpy as np
import pytest

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.balanced import BalancedAssigner


def brute(x, c, beta, metric):
    D = ((x[:, None, :] - c[None]) ** 2).sum(-1) if metric == "l2" else -(x @ c.T)
    return beta[None, :] - D, D


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("spread", [0.1, 30.0])  # beta narrow or wide against the gaps
def test_balanced_labels_are_exact(metric, spread):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    c = rng.standard_normal((100, 8)).astype(np.float32)
    if metric == "ip":
        x, c = normalize_rows(x), normalize_rows(c)
    beta = (spread * rng.standard_normal(100)).astype(np.float32)
    out = BalancedAssigner(c, metric, beta, epsilon=0.5).assign(x, topk=3)
    score, D = brute(x, c, beta, metric)
    expected = np.argsort(-score, axis=1, kind="stable")[:, :3]
    assert (out.label == expected[:, 0]).mean() > 0.999
    assert (out.topk_labels == expected).mean() > 0.999
    assert (out.nearest == D.argmin(1)).mean() > 0.999
    sq = D if metric == "l2" else 2 + 2 * D
    np.testing.assert_allclose(out.distance, sq[np.arange(3000), out.label], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out.topk_probs.sum(1), 1.0, rtol=1e-5)
    assert (np.diff(out.topk_probs, axis=1) <= 1e-6).all()
    single = BalancedAssigner(c, metric, beta).assign(x)
    np.testing.assert_array_equal(single.label, out.label)
    np.testing.assert_array_equal(single.nearest, out.nearest)


def test_without_beta_is_nearest():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 4)).astype(np.float32)
    c = rng.standard_normal((7, 4)).astype(np.float32)
    out = BalancedAssigner(c, "l2").assign(x, topk=2)
    _, D = brute(x, c, np.zeros(7, np.float32), "l2")
    np.testing.assert_array_equal(out.label, D.argmin(1))
    np.testing.assert_array_equal(out.label, out.nearest)
    assert out.topk_probs is None and out.topk_labels.shape == (500, 2)
