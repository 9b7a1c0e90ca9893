"""A run's fingerprint: what its result depends on, checked before anything is reused.

A finished output is returned as it is only to a rerun with the same fingerprint; a
checkpoint resumes only under the same one. Input files are pinned by name, size and
version (an object's ETag or generation, a local file's modification time), so a file
rewritten in place is a different input even when the row count is the same.

Settings that change how a run executes but not what it computes (workers, timeouts,
the Ray address, credentials) are left out: rerunning on a bigger cluster reuses the
finished result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pseudolabel.pipelines.errors import ConfigError
from pseudolabel.pipelines.io.storage import Location, resolve, storage_errors

# How a run executes, not what it computes. (Lloyd's sums are float64 and reduced in a
# fixed order: the worker count does not change the labels; see test_shards.)
OPERATIONAL = frozenset(
    {
        "output",
        "overwrite",
        "run_date",  # already expanded into the URLs it changes
        "previous_run",  # drift is reported against it; the labels do not depend on it
        "score_cache_gb",
        "workers",
        "cpus_per_worker",
        "gpus_per_worker",
        "label_workers",
        "label_batch_rows",
        "label_from",  # the same rows and labels either way (tests/pipelines/test_run.py)
        "max_restarts",
        "startup_timeout",
        "task_timeout",
        "backend",  # as "workers": the same fit, balanced duals to rounding (test_backend)
        "ray_address",
        "ray_num_cpus",
        "storage_options",
        "allow_incomplete_previous",
    }
)
# Files named by a setting whose content the result depends on, pinned like the input.
PINNED_FILES = ("init_centroids", "cluster_proportions")
VERSION_KEYS = ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified")


def file_version(info: dict[str, Any]) -> str:
    """The first version-like field fsspec reports for a file ("" if it has none)."""
    for key in VERSION_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    return ""


def files_digest(root: Location, suffixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """{files, bytes, sha256} of the files under ``root`` (as ``Location.files`` lists
    them): one listing, no file opened."""
    with storage_errors(root.url):
        listing = root.file_infos(suffixes)
    h = hashlib.sha256()
    for name, info in listing:
        h.update(f"{name}\t{info.get('size')}\t{file_version(info)}\n".encode())
    return {
        "files": len(listing),
        "bytes": sum(int(info.get("size") or 0) for _, info in listing),
        "sha256": h.hexdigest(),
    }


def run_fingerprint(config: Any, suffixes: tuple[str, ...]) -> dict[str, Any]:
    """The fingerprint of a run or a curation (a RunConfig or a subclass)."""
    return settings_fingerprint(config, OPERATIONAL, suffixes)


def settings_fingerprint(
    config: Any, operational: frozenset[str], suffixes: tuple[str, ...]
) -> dict[str, Any]:
    """Every setting of the dataclass ``config`` not in ``operational``, in declaration
    order, then its input files and the files that its settings name (PINNED_FILES)."""
    out: dict[str, Any] = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in operational
    }
    out["input_files"] = files_digest(resolve(config.input, config.storage_options), suffixes)
    for name in PINNED_FILES:
        url = getattr(config, name, None)
        if url:
            loc = resolve(url, config.storage_options)
            out[f"{name}_file"] = files_digest(loc) if loc.exists() else None
    return json.loads(json.dumps(out))  # as a manifest will hold it: lists, not tuples


def first_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """'field: old -> new' for the first field (in ``new``'s order) that differs."""
    if old is None:
        return "no fingerprint recorded (written by an older pseudolabel)"
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            return f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
    return None


def _short(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['files']} files, {value['bytes']} bytes, sha256 {value['sha256'][:12]}"
    return repr(value)


def refuse_stale(url: str, what: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Raise when ``old`` (a finished run's or a checkpoint's fingerprint) is not ``new``."""
    difference = first_difference(old, new)
    if difference is not None:
        raise ConfigError(
            f"{url} holds {what} of different settings or input ({difference}); "
            "rerun with --overwrite to replace it, or choose another --output"
        )
