"""Starts the chaos run (``background.py``) when the suite is collected with its test
among those to run: the rest of the suite runs while it does."""

from __future__ import annotations

import pytest

from tests.cluster.background import CHAOS, start_chaos

CHAOS_TEST = "test_chaos.py::test_every_disturbance_leaves_the_labels_of_an_undisturbed_run"


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.nodeid.endswith(CHAOS_TEST) for item in session.items):
        session.config.stash[CHAOS] = start_chaos()


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(CHAOS, None)
    if run is not None and run.work.exists():  # its test never ran: end and remove it
        run.stop()
