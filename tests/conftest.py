"""Shared fixtures: small synthetic mixtures with a known ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data import mixture


@pytest.fixture
def mixture_data() -> tuple[np.ndarray, np.ndarray]:
    return mixture(20_000, 16, 40, seed=0)
