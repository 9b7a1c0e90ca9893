"""GPU workers from zero: ``pseudolabel run --gpus-per-worker 1`` on a head with no GPU
and a fake ``GPU: 1`` worker type that the autoscaler launches on demand.

The fake GPUs cannot compute, so each worker finds no CUDA device inside its actor,
warns, and runs on the CPU; the manifest records that per worker. The label pass must
use the number of GPU actors asked for (an autoscaling GPU actor pool could stay at one
actor, ray#59144), and the nodes must go away once the run is over.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time

import numpy as np
import pytest

from pseudolabel.ops.gpu import torch_cuda_ready
from tests.cluster.autoscaling import FakeAutoscalingCluster
from tests.data import write_parquet_shards
from tests.processes import run_in_session

GPU_NODES = 2
# Each fake GPU node: one worker (1 CPU + 1 GPU) and a CPU for Ray Data's read tasks.
WORKER_TYPES = {
    "gpu_worker": {
        "resources": {"CPU": 2, "GPU": 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": GPU_NODES,
    }
}

# A driver also prints the autoscaler's events ("Removing 2 nodes ... (idle).")
ALIVE_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("alive nodes:", sum(n["Alive"] for n in ray.nodes()))
"""


@pytest.fixture
def cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    fake = FakeAutoscalingCluster(tmp_path / "cluster", WORKER_TYPES, env, idle_minutes=0.1)
    fake.start()
    try:
        yield fake
    finally:
        fake.shutdown()


def alive_nodes(cluster: FakeAutoscalingCluster) -> int:
    done = run_in_session([sys.executable, "-c", ALIVE_NODES, cluster.address],
                          timeout=120, env=cluster.env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("alive nodes:")]
    return int(line.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(torch_cuda_ready(), reason="a real GPU would be visible on the fake GPU nodes")
def test_gpu_workers_come_from_zero_run_and_go(cluster, tmp_path):
    x = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, 4)
    out = tmp_path / "out"
    assert alive_nodes(cluster) == 1  # the head alone: no GPU anywhere yet

    t0 = time.monotonic()
    done = run_in_session(
        [sys.executable, "-m", "pseudolabel", "run", "--input", str(tmp_path / "in"),
         "--output", str(out), "--k", "4", "--iterations", "3", "--ray-address",
         cluster.address, "--workers", str(GPU_NODES), "--gpus-per-worker", "1",
         "--startup-timeout", "120", "--label-from", "stream"],
        timeout=240, env=cluster.env,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:] + cluster.log("monitor.log")[-3000:]
    assert (out / "_SUCCESS").exists()
    assert "see no CUDA device" in text  # the driver says once that workers fell back
    manifest = json.loads((out / "manifest.json").read_text())

    fit = manifest["fit"]
    assert fit["device"] == "cuda"  # asked for
    assert fit["devices"] == ["cpu"] * GPU_NODES  # found, per worker
    assert fit["workers"] == GPU_NODES and fit["nodes"] == GPU_NODES  # one per GPU node
    label = manifest["label"]  # a streaming pass: its own GPU pool, also from the autoscaler
    assert label["source"] == "stream"
    assert label["asked"] == GPU_NODES  # --workers sizes the GPU label pool too
    assert label["actors"] == GPU_NODES  # and the pool was that large (ray#59144)
    assert label["devices"] == ["cpu"] * GPU_NODES
    assert manifest["rows"]["output"] == len(x)
    monitor = cluster.log("monitor.log")
    assert "gpu_worker" in monitor  # the autoscaler launched them

    t1 = time.monotonic()
    while alive_nodes(cluster) > 1:  # idle nodes leave after idle_timeout_minutes (6 s)
        assert time.monotonic() - t1 < 90, cluster.log("monitor.log")[-3000:]
        time.sleep(2)
    print(f"run from zero GPUs: {seconds:.1f} s; scale-down: {time.monotonic() - t1:.1f} s")
