"""A Ray head with a live autoscaler over Ray's fake multi-node provider, on loopback.

``ray.cluster_utils.AutoscalingCluster`` cannot be used as shipped: its example config is
missing from the 2.60 wheel, and its ``start()`` and ``shutdown()`` run ``ray stop
--force``, which would stop every Ray on the machine (DESIGN.md, traps). This writes the
config itself and owns its processes: the head runs ``--block`` in its own session, and
the fake nodes the autoscaler adds are processes under it, so killing that process group
stops exactly this cluster.
"""

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

from tests.s3server import free_port

BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"  # the fake provider names its head node so


def fake_cluster_config(worker_types: dict, gcs_port: int, idle_minutes: float) -> dict:
    """An autoscaler config for the fake provider: a head that takes no work
    (``CPU: 0``, as in aws.yaml) and ``worker_types`` that start at zero."""
    return {
        "cluster_name": "pseudolabel-fake",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",  # the provider assumes 6379 otherwise
        },
        "auth": {},
        "docker": {},
        "head_node_type": HEAD_TYPE,
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """``start()`` returns once the head is up; ``address`` is its GCS address."""

    def __init__(self, root: Path, worker_types: dict, env: dict, idle_minutes: float = 0.1):
        self.root, self.env = root, env
        # Ray's sockets live under its temp dir, and a socket path may not exceed 107
        # bytes: a short directory of its own, removed at shutdown.
        self.temp = Path(tempfile.mkdtemp(prefix="ras", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = fake_cluster_config(worker_types, self.port, idle_minutes)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "autoscaler.json"
        config.write_text(json.dumps(self.config))
        log = self.root / "head.log"
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.port}", "--num-cpus=0", "--num-gpus=0",
             f"--autoscaling-config={config}", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={self.temp}", "--disable-usage-stats"],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def shutdown(self) -> None:
        """SIGTERM to the head's process group, SIGKILL to what is left after 3 s."""
        if self.proc is None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(self.proc):
                time.sleep(0.2)
        self.proc.wait(timeout=5)
        shutil.rmtree(self.temp, ignore_errors=True)

    def log(self, name: str) -> str:
        """The text of the first file called ``name`` under the head's temp dir."""
        for path in sorted(self.temp.rglob(name)):
            return path.read_text(errors="replace")
        return ""


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether a process of the group led by ``proc`` still runs (zombies do not count:
    an orphan's may never be reaped in a container)."""
    proc.poll()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.pid and fields[0] != "Z":  # (state, ppid, pgrp, ...)
            return True
    return False
