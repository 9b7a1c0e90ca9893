"""`ray job submit` against a real head on loopback, with Ray 2.60's token auth."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.data import write_parquet_shards
from tests.processes import kill_session, spawn
from tests.s3server import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def head():
    """A Ray head on free loopback ports (every port that has a fixed default: another Ray
    of the suite may hold that one), with its own temp dir and token. `ray start` runs in
    a session of its own, which its daemons keep: that session's processes are killed
    afterwards (`ray stop` would stop all Ray on the box)."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    # As the launcher files do it: token mode, and the token in a file of its own
    # (there ~/.ray/auth_token; here RAY_AUTH_TOKEN_PATH, so that the user's is untouched).
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{BIN}:{env.get('PATH', '')}",
    )
    dashboard = free_port()
    starter = spawn(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env,
    )  # fmt: skip
    try:
        out, err = starter.communicate(timeout=180)
        assert starter.returncode == 0, out[-2000:] + err[-2000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        kill_session(starter.pid)
        shutil.rmtree(temp, ignore_errors=True)


def submit(env, address, *entrypoint, working_dir=True, timeout=400):
    """``ray job submit``; retried while the head's job agent is not registered yet
    (``ray start`` returns before it is, and a loaded machine can take seconds)."""
    deadline = time.monotonic() + 90
    upload = ["--working-dir", str(REPO)] if working_dir else []
    while True:
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={address}", *upload,
             "--", *entrypoint],
            env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_job_submit_runs_and_commits(head, tmp_path):
    env, address = head
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, 2)
    out = tmp_path / "out"
    done = submit(
        env,
        address,
        "pseudolabel",
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--k",
        "4",
        "--iterations",
        "3",
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "succeeded" in text
    assert "ray: joined" in text  # the driver joined the cluster, it did not start its own
    assert (out / "_SUCCESS").exists()


def submit_echo(env, address):
    return submit(env, address, "echo", "ran", working_dir=False, timeout=120)


def test_job_server_refuses_a_job_without_the_token(head):
    env, address = head
    allowed = submit_echo(env, address)  # the control: the same submission, with the token
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "ran" in allowed.stdout
    anonymous = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = submit_echo(anonymous, address)
    assert refused.returncode != 0 and "ran" not in refused.stdout
    assert "Unauthorized: Missing authentication token" in refused.stderr, refused.stderr[-2000:]
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}  # RAY_AUTH_TOKEN comes before the file
    refused = submit_echo(wrong, address)
    assert refused.returncode != 0 and "ran" not in refused.stdout
    assert "Forbidden: Invalid authentication token" in refused.stderr, refused.stderr[-2000:]
