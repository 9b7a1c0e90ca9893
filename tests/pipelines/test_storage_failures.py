"""Storage as it fails for real: odd local names, a full or read-only disk, a folder this
user may not write, and a server that accepts a connection and never answers.

Disks are real tmpfs mounts and the permission check runs the real CLI without the
root privilege that bypasses file modes; each test says which privilege it needs and
skips, naming it, where the machine does not grant it.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pseudolabel.pipelines.errors import StorageError
from pseudolabel.pipelines.io.layout import CENTROIDS, RunOutput
from pseudolabel.pipelines.io.plan import ReadSettings, make_plan
from pseudolabel.pipelines.io.storage import resolve, storage_errors, with_timeouts
from tests.data import write_parquet_shards

BIN = Path(sys.executable).parent

# ------------------------------------------------------------------ local names with ::


def test_a_local_path_with_double_colons_is_a_plain_path(tmp_path):
    root = tmp_path / "a::b"
    loc = resolve(str(root / "in"))
    assert loc.url == loc.path == str(root / "in") and loc.is_local
    loc.join("x.bin").write_bytes(b"1")
    assert (root / "in" / "x.bin").read_bytes() == b"1"
    assert [f.url for f in loc.files()] == [str(root / "in" / "x.bin")]
    assert loc.join("x.bin").read_bytes() == b"1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a::b"]  # nothing written to .../a
    assert resolve(f"file://{root}/in").path == loc.path


def test_plan_and_output_in_folders_with_double_colons(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    write_parquet_shards(tmp_path / "in::put", x, 3)
    plan = make_plan(str(tmp_path / "in::put"), ReadSettings())
    assert len(plan.files) == 3 and plan.total_rows == 300 and plan.dim == 4
    assert all("in::put/part-" in f.url for f in plan.files)

    out = RunOutput(resolve(str(tmp_path / "out::put")))
    out.root.check_writable()
    out.write_array(CENTROIDS, x[:2])
    out.commit({"rows": 300})
    assert out.committed() and out.manifest() == {"rows": 300}
    names = sorted(p.name for p in (tmp_path / "out::put").iterdir())
    assert names == ["_SUCCESS", CENTROIDS, "manifest.json"]


# ------------------------------------------------ a full or read-only disk, a denied folder


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that fills up for real (needs mount(2): root with
    CAP_SYS_ADMIN, which a container may lack)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs CAP_SYS_ADMIN): {mounted.stderr.decode()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(disk: Path) -> None:
    """Write to ``disk`` until it has no free block left."""
    with open(disk / "ballast", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def pseudolabel(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [*prefix, str(BIN / "pseudolabel"), *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pseudolabel:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_full_disk_fails_the_run_in_one_line(tmp_path, tmpfs):
    out = tmpfs / "out"
    out.mkdir()
    fill(tmpfs)
    result = pseudolabel("run", "--input", str(tmp_path / "in"), "--output", str(out), "--k", "2")
    line = one_error_line(result)
    assert line == f"pseudolabel: error: {out}: no space left on device"
    assert list(out.iterdir()) == []  # the probe's temporary file is gone


def test_a_write_that_fills_the_disk_keeps_the_old_file(tmpfs):
    output = RunOutput(resolve(str(tmpfs / "out")))
    output.write_array(CENTROIDS, np.ones((4, 4), np.float32))
    with pytest.raises(StorageError) as err:
        output.write_array(CENTROIDS, np.zeros((512, 1024), np.float32))  # 2 MiB
    assert str(err.value) == f"{tmpfs / 'out' / CENTROIDS}: no space left on device"
    assert os.listdir(tmpfs / "out") == [CENTROIDS]  # no temporary file left
    assert np.load(tmpfs / "out" / CENTROIDS).shape == (4, 4)  # the old one is intact


def test_a_read_only_disk_is_named(tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(StorageError, match=f"^{tmpfs}/out: read-only file system$"):
        resolve(str(tmpfs / "out")).check_writable()


def unprivileged() -> tuple[str, ...]:
    """A command prefix that runs without the capabilities that let root ignore file
    modes (or none, when this process is not root)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE as root")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")


def test_a_denied_output_folder_is_one_line_without_cloud_advice(tmp_path):
    out = tmp_path / "locked"
    out.mkdir(mode=0o555)
    prefix = unprivileged()
    probe = subprocess.run([*prefix, "touch", str(out / "x")], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("this user writes a mode 0555 folder: needs CAP_SETPCAP to drop root's")
    result = pseudolabel(
        "run", "--input", str(tmp_path / "in"), "--output", str(out), "--k", "2", prefix=prefix
    )
    line = one_error_line(result)
    assert line.startswith(f"pseudolabel: error: {out}: permission denied")
    assert "AWS" not in line and "credential" not in line
    assert list(out.iterdir()) == []


# ------------------------------------------------------------- timeouts, every backend


def test_every_backend_gets_bounded_timeouts_that_options_override():
    import aiohttp

    http = with_timeouts("https://host/x", {})["client_kwargs"]["timeout"]
    assert http == aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    mine = with_timeouts("http://h/x", {"client_kwargs": {"timeout": {"sock_read": 1}}})
    assert mine["client_kwargs"]["timeout"] == aiohttp.ClientTimeout(sock_connect=5, sock_read=1)
    gcs = with_timeouts("gs://b/x", {"project": "p"})
    assert gcs["requests_timeout"] == http and gcs["project"] == "p"
    assert with_timeouts("gcs://b/x", {"requests_timeout": 7})["requests_timeout"] == 7
    for url in ("az://c/x", "abfs://c/x", "abfss://c/x"):
        assert with_timeouts(url, {"read_timeout": 9}) == {
            "connection_timeout": 5,
            "read_timeout": 9,
        }
    s3 = with_timeouts("s3://b/x", {"config_kwargs": {"read_timeout": 2}})["config_kwargs"]
    assert s3["connect_timeout"] == 5 and s3["read_timeout"] == 2
    assert with_timeouts("memory://x", {}) == {}


class Server:
    """HTTP on a loopback port that serves ``body``, or with ``stall`` accepts every
    connection and never answers (a hung proxy or a stalled object store)."""

    def __init__(self, body: bytes = b"", stall: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        if stall:
            threading.Thread(target=self._hold, daemon=True).start()
            self.http = None
            return
        self.sock.close()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(body))
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def _hold(self) -> None:
        with closing(self.sock):
            while True:
                try:
                    self.held.append(self.sock.accept()[0])
                except OSError:
                    return  # closed by stop()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.sock.close()
        for c in self.held:
            c.close()


def _handler(body: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._send(body, send_body=False)

        def do_GET(self):
            start, _, end = self.headers.get("Range", "bytes=0-").split("=")[1].partition("-")
            part = body[int(start) : int(end) + 1 if end else None]
            self._send(part, status=206 if "Range" in self.headers else 200)

        def _send(self, data: bytes, status: int = 200, send_body: bool = True):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if send_body:
                self.wfile.write(data)

    return Handler


@pytest.fixture
def server() -> Iterator[type[Server]]:
    started: list[Server] = []

    def start(**kw) -> Server:
        started.append(Server(**kw))
        return started[-1]

    yield start
    for s in started:
        s.stop()


# A JSON-friendly bound, as --storage-options carries it: 0.5 s without a byte.
SHORT = {"client_kwargs": {"timeout": {"sock_read": 0.5}}, "skip_instance_cache": True}


def test_a_stalled_http_server_fails_within_the_bound(server):
    url = server(stall=True).url("x.npy")
    t0 = time.perf_counter()
    with pytest.raises(StorageError) as err, storage_errors(url):
        resolve(url, SHORT).read_bytes()
    assert time.perf_counter() - t0 < 5  # HEAD, then GET: two bounds
    assert str(err.value).startswith(f"{url}: cannot reach the server (")

    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="cannot reach the server"):
        make_plan(url, ReadSettings(storage_options=SHORT))
    assert time.perf_counter() - t0 < 5


def test_an_answering_http_server_reads_with_the_same_bound(server, tmp_path):
    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    body = (tmp_path / "x.npy").read_bytes()
    url = server(body=body).url("x.npy")
    assert resolve(url, SHORT).read_bytes() == body
    plan = make_plan(url, ReadSettings(id_column=None, storage_options=SHORT))
    assert plan.total_rows == 4 and plan.dim == 3
