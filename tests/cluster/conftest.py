"""Starts the chaos run (``test_chaos.py``) in the background when the suite is collected
with its test among those to run: the rest of the suite runs while it does."""

from __future__ import annotations

import pytest

CHAOS = pytest.StashKey()
CHAOS_TEST = "test_chaos.py::test_every_disturbance_leaves_the_labels_of_an_undisturbed_run"


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.nodeid.endswith(CHAOS_TEST) for item in session.items):
        from tests.cluster.test_chaos import start_chaos

        session.config.stash[CHAOS] = start_chaos()


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(CHAOS, None)
    if run is not None and run.work.exists():  # its test never ran: end and remove it
        run.stop()
