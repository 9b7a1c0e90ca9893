"""Chaos: disturb a real run at a random moment, rerun, compare with an undisturbed run.

Its own process (used by test_chaos.py): a ``ray.cluster_utils.Cluster`` of a head and
two worker nodes; every run is the ``pseudolabel`` command line joining it, as a
submitted job would. For each disturbance (the driver killed, a fit worker killed, a
labeler killed, a worker node's raylet removed, a second run started on the same
output) one run is disturbed after a random delay, rerun if it failed, and its labels
compared row by row with the undisturbed run's. Prints one JSON line of findings; the
test asserts on them. ``sys.argv``: input folder, work folder, seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from ray._private.state import actors
from ray.cluster_utils import Cluster

BIN = Path(sys.executable).parent / "pseudolabel"
RUN_TIMEOUT = 240  # seconds for one run; a run that hangs is a finding, not a wait


def args_for(root: str, out: Path, label_from: str = "auto") -> list[str]:
    return [
        str(BIN), "run", "--input", root, "--output", str(out), "--k", "8",
        "--iterations", "15", "--tol", "0", "--workers", "2", "--cpus-per-worker", "0.5",
        "--label-workers", "1", "--label-batch-rows", "500", "--max-restarts", "3",
        "--label-from", label_from,
    ]  # fmt: skip


def start(args: list[str], address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own group: a kill takes the whole driver
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, out + "\n[timed out]"
    return proc.returncode, out


def labels(out: Path) -> dict:
    """id -> label of a committed output, and whether each id occurs once."""
    table = pq.read_table(out / "labels", columns=["id", "label"])
    ids = table.column("id").to_numpy()
    order = np.argsort(ids)
    return {"ids": ids[order], "label": table.column("label").to_numpy()[order]}


def alive_pids(class_name: str) -> list[int]:
    return [
        a["Pid"]
        for a in actors().values()
        if a["State"] == "ALIVE" and class_name in a["ActorClassName"] and a["Pid"]
    ]


def kill_actor_when_up(class_name: str, delay: float, deadline: float) -> str:
    """SIGKILL one live ``class_name`` actor ``delay`` s after the first one is up."""
    while time.monotonic() < deadline:
        pids = alive_pids(class_name)
        if pids:
            time.sleep(delay)
            pids = alive_pids(class_name)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                return f"killed {class_name} pid {pids[0]}"
            return f"no {class_name} left to kill"
        time.sleep(0.05)
    return f"no {class_name} appeared"


def main() -> None:
    root, work, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    report: dict = {"seed": seed, "cases": {}}
    try:
        t0 = time.monotonic()
        code, log = finish(start(args_for(root, work / "undisturbed"), cluster.address))
        assert code == 0, log[-3000:]
        span = time.monotonic() - t0
        report["undisturbed_seconds"] = round(span, 1)
        reference = labels(work / "undisturbed")

        def kill_driver(delay: float, proc: subprocess.Popen, out: Path) -> dict:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            return {"did": "killed the driver"}

        def kill_fit_worker(delay: float, proc: subprocess.Popen, out: Path) -> dict:
            return {"did": kill_actor_when_up("ShardWorker", delay / 4, time.monotonic() + span)}

        def kill_labeler(delay: float, proc: subprocess.Popen, out: Path) -> dict:
            return {"did": kill_actor_when_up("Labeler", delay / 8, time.monotonic() + 2 * span)}

        def remove_a_node(delay: float, proc: subprocess.Popen, out: Path) -> dict:
            time.sleep(delay)
            cluster.remove_node(nodes.pop(0))  # its raylet and every worker on it die
            nodes.append(cluster.add_node(num_cpus=2))  # as an autoscaler would
            return {"did": "removed a worker node"}

        def second_run(delay: float, proc: subprocess.Popen, out: Path) -> dict:
            """The same run on the same output while the first may hold its lease: it
            must refuse, or (once the first finished) return the finished result."""
            time.sleep(delay)
            code, log = finish(start(args_for(root, out), cluster.address))
            return {"did": "started a second run", "second_exit": code,
                    "second_refused": "another run" in log and "lease" in log}  # fmt: skip

        disturbances: dict[str, Callable[[float, subprocess.Popen, Path], dict]] = {
            "driver": kill_driver,
            "fit_worker": kill_fit_worker,
            "label_worker": kill_labeler,
            "raylet": remove_a_node,
            "second_run": second_run,
        }
        for name, disturb in disturbances.items():
            out = work / name
            delay = rng.uniform(0, span)
            # Runs label on the fit's workers; the labeler case labels in a streaming pass,
            # whose Labeler actors it kills (and whose labels must equal the workers').
            label_from = "stream" if name == "label_worker" else "auto"
            proc = start(args_for(root, out, label_from), cluster.address)
            case = {"delay": round(delay, 2), **disturb(delay, proc, out)}
            code, log = finish(proc)
            case["first_exit"] = code
            if code != 0:  # the disturbed run may fail; a rerun must then finish it
                code, log = finish(start(args_for(root, out, label_from), cluster.address))
                case["rerun_exit"] = code
            case["log_tail"] = log[-1500:] if code != 0 else ""
            if code == 0:
                got = labels(out)
                case["rows"] = len(got["ids"])
                case["unique_ids"] = len(np.unique(got["ids"])) == len(got["ids"])
                case["same_ids"] = bool(np.array_equal(got["ids"], reference["ids"]))
                case["same_labels"] = bool(np.array_equal(got["label"], reference["label"]))
            report["cases"][name] = case
        report["rows"] = len(reference["ids"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
