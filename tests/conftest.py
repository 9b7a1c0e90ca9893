"""Shared fixtures: small synthetic mixtures with a known ground truth."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.data import mixture

# Ray Train's controller looks at its workers every 2 s by default, so a finished training
# waits up to 2 s to be noticed, at each start and end of a worker group: 5 s of each of
# the suite's Ray Train runs (measured, 3-epoch head: 22-24 s -> 17-18 s). Only the poll
# cadence changes; every Ray the suite starts, in process or not, inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture
def mixture_data() -> tuple[np.ndarray, np.ndarray]:
    return mixture(20_000, 16, 40, seed=0)
