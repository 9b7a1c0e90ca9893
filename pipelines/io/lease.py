"""One writer per output: a lease object that only one run can create.

A run takes ``OUTPUT/_lease.json`` before it writes anything else, by creating it only
if absent: ``O_EXCL`` on a local disk, a conditional PUT (``If-None-Match: *``) on S3.
Other fsspec stores get a check-then-write, which narrows the race but does not close
it. The lease names its holder and is renewed by a heartbeat; a second run that finds a
live lease fails at once and says who holds it (a Ray job resubmitted while the first
still runs). A lease without a heartbeat for ``expiry`` seconds, or whose holder was a
process of this machine that is gone, belongs to a run that was killed: the next run
takes it over, with a warning. A holder whose lease was taken over meanwhile finds out
at its next heartbeat and refuses to publish (``check``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pseudolabel.pipelines.errors import ConfigError, StorageError
from pseudolabel.pipelines.io.storage import Location, storage_errors

log = logging.getLogger("pseudolabel")

LEASE = "_lease.json"
HEARTBEAT_S = 20.0
EXPIRY_S = 120.0  # six missed heartbeats: the holder is gone


def create_exclusive(loc: Location, data: bytes) -> None:
    """Write ``loc`` only if it does not exist; FileExistsError otherwise."""
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        fd = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    protocols = loc.fs.protocol if isinstance(loc.fs.protocol, tuple) else (loc.fs.protocol,)
    if "s3" in protocols:
        loc.fs.pipe_file(loc.path, data, mode="create")  # If-None-Match: *
        return
    if loc.exists():
        raise FileExistsError(loc.url)
    loc.write_bytes(data)


class Lease:
    def __init__(
        self, root: Location, expiry: float = EXPIRY_S, heartbeat: float = HEARTBEAT_S
    ) -> None:
        self.loc = root.join(LEASE)
        self.expiry, self.heartbeat = expiry, heartbeat
        self.run_id = uuid.uuid4().hex
        self.doc = {
            "holder": f"{socket.gethostname()}:{os.getpid()}",
            "run": self.run_id,
            "since": _now(),
        }
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.doc, "renewed": _now()}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.loc.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign: treated as expired

    def acquire(self) -> Lease:
        """Take the lease, or raise ConfigError naming the live holder."""
        with storage_errors(self.loc.url):
            for _ in range(2):  # a second try after taking over an expired lease
                try:
                    create_exclusive(self.loc, self._body())
                    break
                except FileExistsError:
                    self._take_over_if_expired(self._read())
            else:
                raise ConfigError(f"{self.loc.url}: another run took the lease first")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take_over_if_expired(self, current: dict[str, Any] | None) -> None:
        if current is None:
            return  # released meanwhile: try again
        age = time.time() - _epoch(current.get("renewed"))
        if age < self.expiry and not _dead_here(str(current.get("holder", ""))):
            raise ConfigError(
                f"{self.loc.url.rsplit('/', 1)[0]} is being written by another run "
                f"({current.get('holder')}, since {current.get('since')}, last heartbeat "
                f"{age:.0f} s ago); wait for it to finish, or choose another --output "
                f"(a killed run's lease expires {self.expiry:.0f} s after its last heartbeat)"
            )
        log.warning(
            "%s: taking over the lease of %s, a run that was killed (last heartbeat %.0f s ago)",
            self.loc.url,
            current.get("holder", "an unknown run"),
            age,
        )
        self.loc.delete()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                current = self._read()
                if current is None or current.get("run") != self.run_id:
                    holder = (current or {}).get("holder", "nobody")
                    self.lost = f"the lease was taken over by {holder}"
                    return
                self.loc.write_bytes(self._body())
            except Exception as e:  # a heartbeat that fails is retried at the next beat
                log.warning("%s: lease heartbeat failed (%s)", self.loc.url, e)

    def check(self) -> None:
        """Raise if this run no longer holds the lease (before publishing anything)."""
        if self.lost is None:
            current = self._read()
            if current is None or current.get("run") != self.run_id:
                self.lost = f"the lease was taken over by {(current or {}).get('holder')}"
        if self.lost is not None:
            raise StorageError(f"{self.loc.url}: {self.lost}; this run stops without publishing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.get("run") == self.run_id:
            self.loc.delete()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _dead_here(holder: str) -> bool:
    """Whether ``holder`` ("host:pid") is a process of this machine that no longer runs:
    a killed driver's lease need not wait out its expiry when rerun where it ran."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _epoch(stamp: str | None) -> float:
    try:
        return datetime.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0  # unreadable: as old as can be
