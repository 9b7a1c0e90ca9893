"""The chaos test (tests/cluster/chaos.py): the driver, a fit worker, a labeler, a
worker node's raylet, and a concurrent second run, each at a random moment of a real
run on a three-node Ray cluster. After a rerun where one was needed: exactly one row per
id, and the labels of an undisturbed run, row for row.

The chaos run is a process with a Ray cluster of its own that mostly waits (on process
starts, on its disturbances), so it starts in the background as soon as the suite is
collected (``conftest.py``, ``background.py``) and the other tests run beside it; this test
collects its findings. Run alone, the test starts it itself.

The seed is random on each run of the suite and printed on failure; set CHAOS_SEED to
replay one."""

from __future__ import annotations

import json

import pytest

from tests.cluster.background import CHAOS, ROWS, start_chaos


@pytest.fixture
def chaos(request):
    """The chaos run begun at collection, else one begun now; removed afterwards."""
    run = request.config.stash.get(CHAOS, None) or start_chaos()
    yield run
    run.stop()


def test_every_disturbance_leaves_the_labels_of_an_undisturbed_run(chaos):
    code, stdout, stderr = chaos.result()
    assert code == 0, f"CHAOS_SEED={chaos.seed}\n{stdout[-2000:]}{stderr[-3000:]}"
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["rows"] == ROWS
    assert set(report["cases"]) == {"driver", "fit_worker", "label_worker", "raylet", "second_run"}
    for name, case in report["cases"].items():
        why = f"CHAOS_SEED={chaos.seed} {name}: {json.dumps(case)}"
        finished = case.get("rerun_exit", case["first_exit"])
        assert finished == 0, why
        assert case["rows"] == ROWS and case["unique_ids"] and case["same_ids"], why
        assert case["same_labels"], why
    second = report["cases"]["second_run"]
    # The second run either met the first's lease, or came after it and reused its result.
    assert second["second_refused"] or second["second_exit"] == 0, json.dumps(second)
    assert second["second_refused"] == (second["second_exit"] != 0), json.dumps(second)
