"""One fsspec wrapper: a local folder, s3:// or any fsspec URL look alike to the pipeline.

Credentials reach s3fs the standard AWS way (environment, profile, instance role) or
through ``storage_options`` (endpoint_url for MinIO or Ceph, key, secret). A ``Location``
prints as its URL only, so options never reach a log line or an error message.

Failures: transient ones (503, SlowDown, timeouts, dropped connections) are retried
with backoff by botocore and s3fs, within the bounded timeouts set here; permanent ones
(a missing bucket, refused credentials, an endpoint that does not answer) surface as one
``StorageError`` naming the URL, which ``check_readable``/``check_writable`` raise before
any Ray work starts.
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

from pseudolabel.pipelines.errors import InputError, StorageError

# S3 defaults, each overridable through storage_options["config_kwargs"]: a connection
# attempt gives up after 5 s, a read after 60 s, and botocore makes 4 attempts in all
# ("standard" mode: exponential backoff with jitter, throttling and 5xx retried).
S3_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 4, "mode": "standard"},
}


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
        with self.fs.open(self.path, "rb") as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object. On a local disk: a temporary file, then an atomic rename
        (an object store's PUT is already all-or-nothing)."""
        parent = posixpath.dirname(self.path)
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)

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
        if not self.fs.exists(self.path):
            return []
        if self.fs.isfile(self.path):
            return [("", self.fs.info(self.path))]
        found = []
        for p, info in sorted(self.fs.find(self.path, detail=True).items()):
            rel = posixpath.relpath(_strip(self.fs, p), self.path)
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                continue
            if not suffixes or p.endswith(tuple(suffixes)):
                found.append((rel, info))
        return found

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
                if not self.is_local and not self.fs.exists(self._bucket()):
                    raise self._no_bucket()
                raise InputError(f"{self.url} does not exist")

    def check_writable(self) -> None:
        """Write and delete a probe object: credentials, bucket and endpoint are checked
        here, in seconds, instead of deep inside a Ray Data write."""
        probe = self.join(f"_probe-{uuid.uuid4().hex}")
        with storage_errors(self.url):
            try:
                probe.write_bytes(b"")
            except FileNotFoundError:
                raise self._no_bucket() from None
            probe.remove()

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
    """A Location for a local path or any fsspec URL (s3://bucket/prefix, gs://, memory://)."""
    if not url:
        raise InputError("an empty path was given")
    options = dict(storage_options or {})
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    if url.startswith(("s3://", "s3a://")):
        options["config_kwargs"] = {**S3_CONFIG, **options.get("config_kwargs", {})}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {url}: {e}") from None
    if _is_local(fs):
        path = os.path.abspath(path)
        url = path
    return Location(url.rstrip("/") or url, fs, path.rstrip("/") or path)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the store's permanent failures into one StorageError naming ``url``.

    Messages come from the exception type and the store's error code only: never from
    the storage options, so no credential can reach a log line.
    """
    try:
        yield
    except (InputError, StorageError):
        raise
    except PermissionError:
        raise StorageError(
            f"{url}: access denied: check the credentials (AWS_ACCESS_KEY_ID, profile or "
            "--storage-options) and the bucket policy"
        ) from None
    except FileNotFoundError as e:
        raise StorageError(f"{url}: not found ({first_line(e)})") from None
    except Exception as e:  # botocore / aiohttp connection and timeout errors, or the
        # OSError s3fs raises once its and botocore's retries are spent
        if is_transport_error(e):
            raise StorageError(
                f"{url}: cannot reach the object store ({type(e).__name__}); check the "
                "endpoint and the network"
            ) from None
        if isinstance(e, OSError):
            raise StorageError(
                f"{url}: the object store refused, after retries: {first_line(e)}"
            ) from None
        raise


def is_transport_error(e: BaseException) -> bool:
    """A network failure (after the client's own retries), not a property of the data.
    aiohttp's connection errors subclass OSError, so they must not pass for corruption."""
    name = type(e).__name__
    return any(word in name for word in ("Connect", "Timeout", "Endpoint", "Connection"))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), capped."""
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)
