"""One fsspec wrapper: a local folder, s3:// or any fsspec URL look alike to the pipeline.

Credentials reach s3fs the standard AWS way (environment, profile, instance role) or
through ``storage_options`` (endpoint_url for MinIO or Ceph, key, secret). A ``Location``
prints as its URL only, so options never reach a log line or an error message.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs

from pipelines.errors import InputError


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
        if not self.fs.exists(self.path):
            return []
        if self.fs.isfile(self.path):
            return [self]
        found = []
        for p in sorted(self.fs.find(self.path)):
            rel = posixpath.relpath(_strip(self.fs, p), self.path)
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                continue
            if not suffixes or p.endswith(tuple(suffixes)):
                found.append(self.join(rel))
        return found

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def move_to(self, dest: Location) -> None:
        if self.is_local:
            os.makedirs(posixpath.dirname(dest.path), exist_ok=True)
            os.replace(self.path, dest.path)
        else:
            self.fs.mv(self.path, dest.path)

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
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {url}: {e}") from None
    if _is_local(fs):
        path = os.path.abspath(path)
        url = path
    return Location(url.rstrip("/") or url, fs, path.rstrip("/") or path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)
