import numpy as np

from pseudolabel.ops.probe import head_features, linear_probe, make_head
from tests.data import mixture


def test_probe_separates_a_mixture_and_not_noise():
    x, truth = mixture(4000, 16, 5, seed=0)
    good = linear_probe(x[:3000], truth[:3000], x[3000:], truth[3000:])
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    bad = linear_probe(noise[:3000], truth[:3000], noise[3000:], truth[3000:])
    assert good > 0.95 and bad < 0.4


def test_head_features_shapes():
    x = np.zeros((10, 8), np.float32)
    assert head_features(make_head(8, 4, "mlp", 32), x).shape == (10, 32)
    assert head_features(make_head(8, 4, "linear"), x).shape == (10, 4)
