"""Shared fixtures: small synthetic mixtures with a known ground truth."""

from __future__ import annotations

import numpy as np
import pytest


def gaussian_mixture(
    n: int, d: int, components: int, seed: int = 0, spread: float = 0.3, weights=None
) -> tuple[np.ndarray, np.ndarray]:
    """x (n, d) float32 drawn around ``components`` random means; returns (x, truth)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((components, d)).astype(np.float32)
    truth = rng.choice(components, size=n, p=weights)
    x = means[truth] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return x.astype(np.float32), truth


@pytest.fixture
def mixture() -> tuple[np.ndarray, np.ndarray]:
    return gaussian_mixture(20_000, 16, 40, seed=0)
