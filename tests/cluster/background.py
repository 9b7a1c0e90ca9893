"""The chaos run (``chaos.py``) as a background process: started when the suite is
collected (``conftest.py``), collected by ``test_chaos.py``. Both import this module
under one name, so the stash key below is the same object for both (pytest imports
conftest files and test modules under names of its own)."""

from __future__ import annotations

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
    # one would stop the run. A Ray temp dir of its own: its cluster's head writes the
    # "current cluster" address there, where a ray.init() of another test, which
    # looks in /tmp/ray, does not find it and join it.
    env = {**os.environ, "RAY_TMPDIR": str(work)}
    with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
        proc = spawn([sys.executable, str(script), str(work / "in"), str(work), str(seed)],
                     stdout=out, stderr=err, cwd=Path(__file__).parents[2], env=env)  # fmt: skip
    return ChaosRun(proc, seed, work)


# The run started at collection, kept on the session's config.
CHAOS = pytest.StashKey["ChaosRun"]()
