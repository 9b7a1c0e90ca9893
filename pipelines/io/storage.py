"""One fsspec wrapper: a local folder, s3:// or any fsspec URL look alike to the pipeline.

A path without "://" (or a file:// URL) is a plain local path, whatever it holds: "::"
in a folder name is part of the name, never an fsspec URL chain.

Credentials reach s3fs the standard AWS way (environment, profile, instance role) or
through ``storage_options`` (endpoint_url for MinIO or Ceph, key, secret). A ``Location``
prints as its URL only, so options never reach a log line or an error message.

Timeouts: every network backend gets a bounded connect and read timeout by default, so
a store that accepts a connection and never answers fails instead of hanging a run.
Each is a ``storage_options`` key the user's value overrides (``with_timeouts``):

    s3://, s3a://        config_kwargs: connect_timeout 5, read_timeout 60 (seconds),
                         retries {max_attempts 4, mode standard} (botocore)
    http://, https://    client_kwargs.timeout: sock_connect 5, sock_read 60, no total
                         (fsspec's HTTPFileSystem; aiohttp's own default is 5 min total,
                         which would also cut a long download short)
    gs://, gcs://        requests_timeout: the same as http (gcsfs passes it to every
                         request, and retries a timed-out one 6 times with backoff)
    az://, abfs://, abfss://   connection_timeout 5, read_timeout 60 (adlfs; the Azure
                         SDK's own read timeout is 80,000 s)

An aiohttp timeout may be given as a mapping of ``aiohttp.ClientTimeout`` fields, as
JSON carries it (``{"client_kwargs": {"timeout": {"sock_read": 10}}}``); it is merged
over the default above.

Failures: transient ones (503, SlowDown, timeouts, dropped connections) are retried
with backoff by botocore and s3fs, within the bounded timeouts set here; permanent ones
(a missing bucket, refused credentials, an endpoint that does not answer, a full or
read-only local disk) surface as one ``StorageError`` naming the URL, which
``check_readable``/``check_writable`` raise before any Ray work starts.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pseudolabel.pipelines.errors import InputError, StorageError

# S3 defaults, each overridable through storage_options["config_kwargs"]: a connection
# attempt gives up after 5 s, a read after 60 s, and botocore makes 4 attempts in all
# ("standard" mode: exponential backoff with jitter, throttling and 5xx retried).
S3_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 4, "mode": "standard"},
}
# aiohttp (http, gcs): 5 s to connect, 60 s without a byte; no cap on a whole transfer.
AIOHTTP_TIMEOUT = {"total": None, "sock_connect": 5, "sock_read": 60}
# adlfs (Azure): seconds to connect, and between two reads.
AZURE_TIMEOUTS = {"connection_timeout": 5, "read_timeout": 60}
# Written by check_writable: not empty, so a disk with no free block fails there (an
# empty file needs no data block).
PROBE = b"pseudolabel write probe\n"


@dataclass(frozen=True)
class Location:
    """A path on one filesystem. ``url`` is what users see; ``path`` is what fsspec wants."""

    url: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str

    @property
    def is_local(self) -> bool:
        return _is_local(self.fs)

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        url = posixpath.join(self.url, *parts)
        return Location(url, self.fs, path)

    def child(self, path: str) -> Location:
        """The Location of ``path``, an fsspec path below this one (as ``find`` returns)."""
        rel = posixpath.relpath(_strip(self.fs, path), self.path)
        return self.join(rel)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def read_bytes(self) -> bytes:
        # One whole-object GET. Not ``fs.open``: s3fs's file object pins the ETag from its
        # HEAD and its ranged GETs fail (412, FileExpired) if the object is rewritten in
        # between, as a lease heartbeat does.
        return self.fs.cat_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object. On a local disk: a temporary file, then an atomic rename
        (an object store's PUT is already all-or-nothing); a local failure (disk full,
        permission, read-only) is a StorageError naming this path."""
        if self.is_local:
            with storage_errors(self.url):
                self._put(data)
        else:
            self._put(data)

    def _put(self, data: bytes) -> None:
        if not self.is_local:
            self.fs.pipe_file(self.path, data)
            return
        os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            # Invariant: a failed write leaves the old file, if any, and no temporary.
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def files(self, suffixes: Iterable[str] = ()) -> list[Location]:
        """Files below this location, sorted, recursing into partition folders.

        Names starting with "_" or "." are skipped, as Spark and Hive do (``_SUCCESS``,
        ``_checkpoints``, ``.crc``), and so are the folders that hold them.
        """
        return [self.join(rel) if rel else self for rel, _ in self.file_infos(suffixes)]

    def file_infos(self, suffixes: Iterable[str] = ()) -> list[tuple[str, dict[str, Any]]]:
        """(path relative to this location, fsspec's info: size, ETag or mtime, ...) of
        the files that ``files`` lists, from the same single listing; "" for a file
        location itself."""
        return self.listing(suffixes)[0]

    def listing(
        self, suffixes: Iterable[str] = ()
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
        """``file_infos``, and the relative paths of the files with a wanted suffix that
        the name rule left out (``_part.parquet``, ``.x.npy``), from one listing."""
        if not self.fs.exists(self.path):
            return [], []
        if self.fs.isfile(self.path):
            return [("", self.fs.info(self.path))], []
        wanted, found, ignored = tuple(suffixes), [], []
        for p, info in sorted(self.fs.find(self.path, detail=True).items()):
            rel = posixpath.relpath(_strip(self.fs, p), self.path)
            if wanted and not p.endswith(wanted):
                continue
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                ignored.append(rel)
            else:
                found.append((rel, info))
        return found, ignored

    def delete(self) -> None:
        """Delete one object by name, in one request; a missing one is fine."""
        with suppress(FileNotFoundError):
            self.fs.rm_file(self.path)

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def move_to(self, dest: Location) -> None:
        if self.is_local:
            os.makedirs(posixpath.dirname(dest.path), exist_ok=True)
            os.replace(self.path, dest.path)
        else:
            self.fs.mv(self.path, dest.path)

    def check_readable(self) -> None:
        """Fail fast, with a clear message, when the input cannot be listed."""
        with storage_errors(self.url):
            if not self.fs.exists(self.path):
                self._raise_if_unreachable()
                if self._has_buckets() and not self.fs.exists(self._bucket()):
                    raise self._no_bucket()
                raise InputError(f"{self.url} does not exist")

    def check_writable(self) -> None:
        """Write and delete a probe object: credentials, bucket, endpoint and free space
        are checked here, in seconds, instead of deep inside a Ray Data write. Errors
        name this location, not the probe."""
        probe = self.join(f"_probe-{uuid.uuid4().hex}")
        with storage_errors(self.url):
            try:
                probe._put(PROBE)
            except FileNotFoundError:
                if self.is_local:
                    raise
                raise self._no_bucket() from None
            probe.remove()

    def _raise_if_unreachable(self) -> None:
        """fsspec's ``exists`` answers False when the store does not answer at all (it
        swallows every error); ``info`` raises, and its network failure is let out."""
        if self.is_local:
            return
        try:
            self.fs.info(self.path)
        except FileNotFoundError as e:
            if is_transport_error(e.__cause__):  # fsspec's http: FileNotFoundError from it
                raise

    def _has_buckets(self) -> bool:
        """Whether the path's first part names a bucket (s3, gs, az): not on a disk or a
        plain web server."""
        return not self.is_local and not _protocols(self.fs) & {"http", "https"}

    def _bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def _no_bucket(self) -> StorageError:
        return StorageError(f"{self.url}: bucket {self._bucket()!r} does not exist")

    def arrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem over the same fsspec one, for Ray Data's writers."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def contains(self, other: Location) -> bool:
        """True when ``other`` is this location or lies below it, on the same store."""
        if type(self.fs) is not type(other.fs) or self.fs.protocol != other.fs.protocol:
            return False
        a, b = self.path.rstrip("/"), other.path.rstrip("/")
        return b == a or b.startswith(a + "/")

    def __str__(self) -> str:
        return self.url


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """A Location for a local path or any fsspec URL (s3://bucket/prefix, gs://, memory://).

    A local path is never parsed as a URL ("/data/a::b" is a folder named "a::b"), and
    takes no storage options: they are the remote store's, which the other side of a
    run may use."""
    if not url:
        raise InputError("an empty path was given")
    if is_local_url(url):
        path = os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
        return Location(path, LocalFileSystem(), path)
    options = with_timeouts(url, dict(storage_options or {}))
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {url}: {e}") from None
    if _is_local(fs):  # a chain ending on the local disk ("simplecache::file://...")
        path = os.path.abspath(path)
        url = path
    return Location(url.rstrip("/") or url, fs, path.rstrip("/") or path)


def is_local_url(url: str) -> bool:
    """A plain path, or a file:// URL: the local disk, whatever characters follow."""
    return "://" not in url or url.startswith("file://")


def with_timeouts(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with this module's bounded timeouts for ``url``'s backend added; a
    value the user gave wins (the module docstring lists them)."""
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("s3", "s3a"):
        return {**options, "config_kwargs": {**S3_CONFIG, **options.get("config_kwargs", {})}}
    if protocol in ("http", "https"):
        client = dict(options.get("client_kwargs") or {})
        client["timeout"] = _aiohttp_timeout(client.get("timeout"))
        return {**options, "client_kwargs": client}
    if protocol in ("gs", "gcs"):
        return {**options, "requests_timeout": _aiohttp_timeout(options.get("requests_timeout"))}
    if protocol in ("az", "abfs", "abfss"):
        return {**AZURE_TIMEOUTS, **options}
    return options


def _aiohttp_timeout(value: Any) -> Any:
    """The default aiohttp timeout, with a mapping of ClientTimeout fields merged over
    it; any other value the user gave (a ClientTimeout, a number) is theirs as is."""
    import aiohttp

    if value is None or isinstance(value, dict):
        return aiohttp.ClientTimeout(**{**AIOHTTP_TIMEOUT, **(value or {})})
    return value


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the store's permanent failures into one StorageError naming ``url``.

    Messages come from the exception type, the store's error code and the OS error
    number only: never from the storage options, so no credential can reach a log line.
    """
    try:
        yield
    except (InputError, StorageError):
        raise
    except Exception as e:
        error = storage_error(url, e)
        if error is None:
            raise
        raise error from None


def storage_error(url: str, e: BaseException) -> StorageError | None:
    """The StorageError for ``e`` met at ``url``; None for an error that is not the
    store's (a bug, or bad data). A local path gets the disk's words (no space left on
    device, permission denied), an object store advice about credentials and network."""
    if is_local_url(url):
        if isinstance(e, PermissionError):
            return StorageError(
                f"{url}: permission denied (uid {os.getuid()}): check the owner and mode of "
                "this path and of the folders above it"
            )
        if isinstance(e, FileNotFoundError):
            return StorageError(f"{url}: not found")
        if isinstance(e, OSError):  # ENOSPC: "no space left on device", EROFS, EIO, ...
            return StorageError(f"{url}: {os.strerror(e.errno).lower() if e.errno else e}")
        return None
    # fsspec's http turns a timeout into FileNotFoundError, raised from the timeout
    transport = next((x for x in (e, e.__cause__) if is_transport_error(x)), None)
    if transport is not None:
        server = "server" if url.startswith(("http://", "https://")) else "object store"
        return StorageError(
            f"{url}: cannot reach the {server} ({type(transport).__name__}); check the "
            "endpoint and the network"
        )
    if isinstance(e, PermissionError):
        return StorageError(f"{url}: access denied: {_credential_advice(url)}")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{url}: not found ({first_line(e)})")
    if isinstance(e, OSError):  # what s3fs raises once its and botocore's retries are spent
        return StorageError(f"{url}: the object store refused, after retries: {first_line(e)}")
    return None


def _credential_advice(url: str) -> str:
    if url.startswith(("s3://", "s3a://")):
        return (
            "check the credentials (AWS_ACCESS_KEY_ID, profile or --storage-options) and "
            "the bucket policy"
        )
    return "check the credentials (--storage-options or the store's environment) and its policy"


def is_transport_error(e: BaseException | None) -> bool:
    """A network failure (after the client's own retries), not a property of the data.
    aiohttp's connection errors subclass OSError, so they must not pass for corruption."""
    if e is None:
        return False
    name = type(e).__name__
    return any(word in name for word in ("Connect", "Timeout", "Endpoint", "Connection"))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), capped."""
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)
