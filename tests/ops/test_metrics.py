import itertools

import numpy as np
import pytest
from sklearn import metrics as skm

from pseudolabel.ops.metrics import ari, contingency, matched_accuracy, nmi, size_stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 7, 3000)
    labels = np.where(rng.random(3000) < 0.7, truth, rng.integers(0, 9, 3000))
    table = contingency(labels, truth)
    assert nmi(table) == pytest.approx(skm.normalized_mutual_info_score(truth, labels), abs=1e-10)
    assert ari(table) == pytest.approx(skm.adjusted_rand_score(truth, labels), abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matched_accuracy_is_the_best_one_to_one_matching(seed):
    # Reference: every injective map of 5 classes into 6 labels (720), tried by hand.
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 5, 2000)
    labels = np.where(rng.random(2000) < 0.6, (truth + seed) % 6, rng.integers(0, 6, 2000))
    table = contingency(labels, truth)  # labels x classes
    best = max(
        sum(table[label, cls] for cls, label in enumerate(match))
        for match in itertools.permutations(range(6), 5)
    )
    assert matched_accuracy(table) == best / 2000


def test_perfect_and_permuted_labels():
    truth = np.repeat(np.arange(4), 25)
    table = contingency((truth + 1) % 4, truth)
    assert nmi(table) == pytest.approx(1.0)
    assert ari(table) == pytest.approx(1.0)
    assert matched_accuracy(table) == 1.0


def test_size_stats():
    s = size_stats(np.array([10, 10, 10, 10]))
    assert s["max_over_min"] == 1.0 and s["cv"] == 0.0
    assert s["entropy"] == pytest.approx(1.0) and s["imbalance_factor"] == pytest.approx(1.0)
    skewed = size_stats(np.array([37, 1, 1, 1]))
    assert skewed["imbalance_factor"] > 3 and skewed["entropy"] < 0.5
    assert size_stats(np.array([3, 0]))["max_over_min"] == float("inf")


def test_contingency_of_pairs_counted_elsewhere_equals_counting_rows():
    rng = np.random.default_rng(0)
    labels, truth = rng.integers(0, 5, 300), rng.integers(0, 3, 300)
    pairs, counts = np.unique(np.stack([labels, truth]), axis=1, return_counts=True)
    np.testing.assert_array_equal(
        contingency(pairs[0], pairs[1], counts), contingency(labels, truth)
    )
