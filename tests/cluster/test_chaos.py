"""The chaos test (tests/cluster/chaos.py): the driver, a fit worker, a labeler, a
worker node's raylet, and a concurrent second run, each at a random moment of a real
run on a three-node Ray cluster. After a rerun where one was needed: exactly one row per
id, and the labels of an undisturbed run, row for row.

The chaos run is a process with a Ray cluster of its own that mostly waits (on process
starts, on its disturbances), so it starts in the background as soon as the suite is
collected (``tests/cluster/conftest.py``) and the other tests run beside it; this test
collects its findings. Run alone, the test starts it itself.

The seed is random on each run of the suite and printed on failure; set CHAOS_SEED to
replay one."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data import mixture, write_parquet_shards
from tests.processes import kill_session, spawn

ROWS = 6000
TIMEOUT = 1500  # seconds for the whole chaos run


@dataclass
class ChaosRun:
    proc: subprocess.Popen
    seed: int
    work: Path  # input, outputs, and the process's stdout and stderr

    def result(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr), waiting for the end; on timeout the process and
        its Ray cluster are killed."""
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return code, *((self.work / name).read_text() for name in ("stdout", "stderr"))

    def stop(self) -> None:
        kill_session(self.proc.pid)  # the chaos process and every Ray process it started
        self.proc.wait(timeout=30)
        shutil.rmtree(self.work, ignore_errors=True)


def start_chaos() -> ChaosRun:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    work = Path(tempfile.mkdtemp(prefix="chaos"))
    x, _ = mixture(ROWS, 16, 8, seed=11)
    write_parquet_shards(work / "in", x, shards=6, row_group_rows=500)
    script = Path(__file__).with_name("chaos.py")
    # Output to files, not pipes: nobody reads a pipe until the test runs, and a full
    # one would stop the run.
    with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
        proc = spawn([sys.executable, str(script), str(work / "in"), str(work), str(seed)],
                     stdout=out, stderr=err, cwd=Path(__file__).parents[2])  # fmt: skip
    return ChaosRun(proc, seed, work)


@pytest.fixture
def chaos(request):
    """The chaos run begun at collection, else one begun now; removed afterwards."""
    from tests.cluster.conftest import CHAOS

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
