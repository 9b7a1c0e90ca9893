"""The output layout under ``--output``, and the order in which it becomes visible.

    labels/*.parquet   published by moving files out of _staging/<attempt>/
    centroids.npy      (k, d) float32, no pickle
    duals.npy          with --balanced: (k,) log-duals of the Sinkhorn plan
    manifest.json
    report.html        the run at a glance (``pipelines.commands.report``)
    _SUCCESS           written last: nothing is done before it exists (invariant 5)
    _checkpoints/      ckpt-NNNNNN.npz: iteration state for resuming, kept after success
                       (``pipelines.io.checkpoints``); ckpt-NNNNNN-cJJJJJ.npy: its
                       centroids' slices, where the workers held them (--reduce scatter)

A rerun without ``_SUCCESS`` discards labels/ and _staging/ (never half of them is
trusted) and resumes the fit from the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Any

import numpy as np

from pseudolabel.pipelines.errors import InputError
from pseudolabel.pipelines.io.storage import Location

LABELS, STAGING, CHECKPOINTS = "labels", "_staging", "_checkpoints"
CENTROIDS, MANIFEST, SUCCESS = "centroids.npy", "manifest.json", "_SUCCESS"
DUALS, REPORT = "duals.npy", "report.html"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def load_npy(loc: Location, sha256: str | None = None) -> np.ndarray:
    """The array in ``loc``; with ``sha256``, only if the file is the one recorded (a
    labeler must not label with centroids that another writer has replaced)."""
    try:
        data = loc.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{loc.url} does not exist") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(
            f"{loc.url} is not the file this run wrote (sha256 differs): did another run "
            "write to the same --output?"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{loc.url} is not a numeric .npy array ({e})") from None


class RunOutput:
    def __init__(self, root: Location):
        self.root = root

    @property
    def labels(self) -> Location:
        return self.root.join(LABELS)

    def committed(self) -> bool:
        return self.root.join(SUCCESS).exists()

    def started(self) -> bool:
        """Whether a run has written anything here (committed or not)."""
        names = (SUCCESS, MANIFEST, CENTROIDS, LABELS, STAGING, CHECKPOINTS)
        return any(self.root.join(name).exists() for name in names)

    def clear(self) -> None:
        """Remove a previous run entirely, _SUCCESS first, so no stale marker survives."""
        self.root.join(SUCCESS).remove()
        for name in (MANIFEST, CENTROIDS, DUALS, REPORT, LABELS, STAGING, CHECKPOINTS):
            self.root.join(name).remove()

    def new_staging(self) -> Location:
        """A fresh staging prefix; leftovers of earlier attempts are removed first."""
        self.root.join(STAGING).remove()
        return self.root.join(STAGING, uuid.uuid4().hex)

    def publish(self, staged: list[Location]) -> list[Location]:
        """Move the staged label files into labels/, replacing whatever was there."""
        self.labels.remove()
        published = []
        for i, f in enumerate(staged):
            dest = self.labels.join(f"part-{i:05d}.parquet")
            f.move_to(dest)
            published.append(dest)
        self.root.join(STAGING).remove()
        return published

    def write_array(self, name: str, a: np.ndarray) -> str:
        """Write ``a`` as ``name``; returns the file's sha256."""
        data = npy_bytes(a)
        self.root.join(name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def commit(self, manifest: dict[str, Any]) -> None:
        self.root.join(MANIFEST).write_bytes(json.dumps(manifest, indent=2).encode())
        self.root.join(SUCCESS).write_bytes(b"")

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.root.join(MANIFEST).read_bytes())
