"""The float64 sums of a step: torch's index_add_ where a worker loaded torch, numpy's
bincount where it did not; the two agree to float64 rounding."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pseudolabel.ops.stats import accumulate_sums


@pytest.mark.parametrize("k", [5, 20_000])  # fewer centres than rows, and more
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sums_with_and_without_torch_agree(monkeypatch, k, dtype):
    import torch  # noqa: F401  (loaded: the worker's path for many rows)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((10_000, 7)) * 100).astype(dtype)
    labels = rng.integers(0, k, len(x))
    exact = np.zeros((k, 7))
    np.add.at(exact, labels, x.astype(np.float64))
    with_torch = np.ones((k, 7))  # both add to what is there
    accumulate_sums(x, labels, with_torch)
    monkeypatch.delitem(sys.modules, "torch")  # a worker that never loaded it
    with_numpy = np.ones((k, 7))
    accumulate_sums(x, labels, with_numpy)
    np.testing.assert_allclose(with_torch, exact + 1, rtol=1e-13, atol=1e-10)
    np.testing.assert_allclose(with_numpy, exact + 1, rtol=1e-13, atol=1e-10)
