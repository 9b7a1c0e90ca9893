"""Breaking things on purpose: a worker process killed mid-fit, a driver killed mid-fit
and mid-label. Every wait is bounded and every process started here is cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from pseudolabel.ops.kmeans import KMeansParams, fit, init_state
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.runtime.actors import WorkerSpec
from pseudolabel.pipelines.runtime.shards import ResidentShards
from tests.data import mixture, write_parquet_shards

BIN = Path(sys.executable).parent


def test_worker_killed_mid_fit_is_rebuilt(ray_local, small_dataset):
    root, _, _ = small_dataset
    plan = make_plan(str(root), ReadSettings())
    settings = ReadSettings(dim=plan.dim)
    params = KMeansParams(k=12, iterations=8, tol=0, seed=4)
    results = []
    for kill_at in (None, 3):
        data = ResidentShards.from_plan(
            plan, settings, WorkerSpec("l2", num_cpus=0.5, max_restarts=2), 2
        )
        victim = data.infos[1]["pid"]

        def on_iteration(state, record, kill_at=kill_at, victim=victim):
            if record.iteration == kill_at:
                os.kill(victim, signal.SIGKILL)  # as the OOM killer or a lost node would

        try:
            state = fit(data, params, init_state(data, params)[0], on_iteration)
            if kill_at:
                pids = [i["pid"] for i in ray.get([a.info.remote() for a in data.actors])]
                assert victim not in pids  # a new process took the dead one's shards
            results.append(state)
        finally:
            data.shutdown()
    undisturbed, disturbed = results
    np.testing.assert_allclose(disturbed.centroids, undisturbed.centroids, atol=1e-5)
    assert [r.rows for r in disturbed.history] == [6000] * 8


# ---------------------------------------------------------------------- driver killed


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (socket paths are limited to 107 bytes). Ray's own
    processes outlive a SIGKILLed driver: everything under it is killed at the end."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    subprocess.run(["pkill", "-9", "-f", path], check=False)
    shutil.rmtree(path, ignore_errors=True)


def start(args, ray_tmp, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(
        [str(BIN / "pseudolabel"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def kill_when(proc, marker: str, delay: float = 0.0, timeout: float = 180) -> str:
    """Read the driver's output until ``marker``, then SIGKILL its process group."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            break
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    text = "".join(seen)
    assert marker in text, text[-3000:]
    return text


def finish(args, ray_tmp, timeout=300) -> str:
    proc = start(args, ray_tmp)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory):
    """Big enough that 200 Lloyd iterations last seconds, small enough for a quick label."""
    root = tmp_path_factory.mktemp("slow") / "input"
    x, _ = mixture(120_000, 32, 64, seed=5)
    write_parquet_shards(root, x, shards=4, row_group_rows=10_000)
    return root, len(x)


def run_args(root, out, iterations):
    return [
        "run",
        "--input",
        str(root),
        "--output",
        str(out),
        "--k",
        "64",
        "--iterations",
        str(iterations),
        "--tol",
        "0",
        "--workers",
        "2",
    ]


def assert_complete(out: Path, rows: int) -> dict:
    ids = pq.read_table(out / "labels", columns=["id"]).column("id").to_numpy()
    assert len(ids) == rows and len(np.unique(ids)) == rows  # one row per id, no more
    assert not (out / "_staging").exists()
    return json.loads((out / "manifest.json").read_text())


def test_driver_killed_mid_fit_resumes(slow_dataset, tmp_path, ray_tmp):
    root, rows = slow_dataset
    out = tmp_path / "run"
    args = run_args(root, out, 200)
    kill_when(start(args, ray_tmp), "fit: iter   5/200")
    assert not (out / "_SUCCESS").exists()
    log = finish(args, ray_tmp)
    assert "fit: resuming from iteration" in log
    manifest = assert_complete(out, rows)
    assert manifest["fit"]["resumed_from_iteration"] >= 5
    assert len(manifest["fit"]["history"]) == manifest["fit"]["iterations_run"] == 200


def test_driver_killed_mid_label_leaves_nothing_half_done(slow_dataset, tmp_path, ray_tmp):
    root, rows = slow_dataset
    out = tmp_path / "run"
    args = run_args(root, out, 3)
    kill_when(start(args, ray_tmp), "label: ", delay=1.5)
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    log = finish(args, ray_tmp)
    assert "fit: complete in checkpoint at iteration 3; not refitting" in log
    manifest = assert_complete(out, rows)
    assert manifest["fit"]["resumed_from_iteration"] == 3
