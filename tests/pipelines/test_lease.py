"""One writer per output: the lease, on a local disk and on S3 (moto), and a run that
meets a live one."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from pseudolabel.pipelines.commands.run import run
from pseudolabel.pipelines.errors import ConfigError, StorageError
from pseudolabel.pipelines.io.lease import LEASE, Lease, create_exclusive
from pseudolabel.pipelines.io.storage import resolve
from tests.data import write_parquet_shards
from tests.pipelines.conftest import fast_config


def foreign_lease(path, renewed: str = "2099-01-01T00:00:00+00:00") -> None:
    """A lease held by a run on another machine, renewed at ``renewed``."""
    doc = {"holder": "other-host:4242", "run": "x", "since": renewed, "renewed": renewed}
    path.write_text(json.dumps(doc))


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    root = resolve(str(tmp_path))
    first = Lease(root).acquire()
    try:
        with pytest.raises(ConfigError, match=r"being written by another run \(.*:\d+, since"):
            Lease(root).acquire()
    finally:
        first.release()
    assert not (tmp_path / LEASE).exists()
    with Lease(root):  # free again
        assert (tmp_path / LEASE).exists()


def test_a_killed_runs_lease_is_taken_over(tmp_path, caplog):
    root = resolve(str(tmp_path))
    foreign_lease(tmp_path / LEASE, renewed="2020-01-01T00:00:00+00:00")  # silent for years
    with caplog.at_level(logging.WARNING, logger="pseudolabel"), Lease(root) as lease:
        assert json.loads((tmp_path / LEASE).read_text())["run"] == lease.run_id
    assert "taking over the lease of other-host:4242" in caplog.text
    # A holder on this machine whose process is gone needs no expiry.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True, capture_output=True, check=True,
    )  # fmt: skip
    doc = json.loads(Lease(root)._body())  # fresh: renewed just now
    host = doc["holder"].rsplit(":", 1)[0]
    doc["holder"] = f"{host}:{gone.stdout.strip()}"
    (tmp_path / LEASE).write_text(json.dumps(doc))
    with Lease(root) as lease:
        assert json.loads((tmp_path / LEASE).read_text())["run"] == lease.run_id


def test_a_holder_whose_lease_was_taken_does_not_publish(tmp_path):
    lease = Lease(resolve(str(tmp_path)), heartbeat=0.05).acquire()
    try:
        lease.check()  # held
        foreign_lease(tmp_path / LEASE)  # taken over meanwhile
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until a heartbeat finds the lease taken
        assert lease.lost is not None
        with pytest.raises(StorageError, match="taken over by other-host:4242"):
            lease.check()
        assert json.loads((tmp_path / LEASE).read_text())["holder"] == "other-host:4242"
    finally:
        lease.release()
    assert (tmp_path / LEASE).exists()  # not ours to delete


def test_exclusive_create_on_s3(s3, bucket):
    root = resolve(f"s3://{bucket}/runs/leased", s3.options())
    create_exclusive(root.join("x"), b"first")
    with pytest.raises(FileExistsError):  # a conditional PUT, refused by the server
        create_exclusive(root.join("x"), b"second")
    assert root.join("x").read_bytes() == b"first"
    with Lease(root), pytest.raises(ConfigError, match="being written by another run"):
        Lease(root).acquire()


def test_a_lease_renewed_while_it_is_read_is_read_whole(s3, bucket):
    """The lease's heartbeat rewrites it at any moment. A reader that pinned the ETag of a
    HEAD and then sent a conditional GET got 412 (s3fs FileExpired): the CI failure of
    stop 22. Here the object changes between the client's first look and its GET."""
    root = resolve(f"s3://{bucket}/runs/renewed", s3.options())
    loc = root.join(LEASE)
    loc.write_bytes(b'{"renewed": "first"}')
    upstream = s3.fs()  # same server, through the proxy; the hook runs before forwarding

    def renew(path: str) -> None:
        if path.endswith(LEASE) and s3.proxy.before_get is not None:
            s3.proxy.before_get = None  # once, and not for our own PUT's internals
            upstream.pipe_file(loc.path, b'{"renewed": "second"}')

    s3.proxy.before_get = renew
    assert loc.read_bytes() == b'{"renewed": "second"}'


def test_run_refuses_an_output_another_run_is_writing(ray_local, tmp_path):
    x = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32)
    write_parquet_shards(tmp_path / "in", x, 1)
    (tmp_path / "out").mkdir()
    foreign_lease(tmp_path / "out" / LEASE)
    config = fast_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), k=3)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"being written by another run \(other-host:4242"):
        run(config)
    assert time.monotonic() - t0 < 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LEASE]  # nothing else
