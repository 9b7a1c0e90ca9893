"""Starts the chaos run (``background.py``) when the suite is collected with its test
among those to run, and moves that test near the end (after pytest-randomly's shuffle,
which the rest of the suite keeps): the rest of the suite runs while the chaos run does.
Only the tests marked ``quiet`` (they assert a bound of a few seconds, which a busy
2-core machine misses) follow it, once the chaos run has ended."""

from __future__ import annotations

import pytest

from tests.cluster.background import CHAOS, start_chaos

CHAOS_TEST = "test_chaos.py::test_every_disturbance_leaves_the_labels_of_an_undisturbed_run"


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    chaos = [item for item in session.items if item.nodeid.endswith(CHAOS_TEST)]
    if chaos:
        quiet = [item for item in session.items if item.get_closest_marker("quiet")]
        moved = {id(item) for item in chaos + quiet}
        rest = [item for item in session.items if id(item) not in moved]
        session.items[:] = rest + chaos + quiet
        session.config.stash[CHAOS] = start_chaos()


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(CHAOS, None)
    if run is not None and run.work.exists():  # its test never ran: end and remove it
        run.stop()
