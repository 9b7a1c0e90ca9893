"""Per-iteration fit state under ``OUTPUT/_checkpoints/``, for resuming."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from typing import Any

import numpy as np

from pseudolabel.ops.kmeans import IterationRecord, KMeansState
from pseudolabel.pipelines.io.fingerprint import refuse_stale
from pseudolabel.pipelines.io.storage import Location

log = logging.getLogger("pseudolabel")


class Checkpoints:
    """Per-iteration fit state, one object per checkpoint: ``ckpt-NNNNNN.npz`` holds the
    centroids, the mini-batch weights and the state as JSON text, and is written whole
    (one PUT on an object store, a temporary file and a rename on a disk), so any
    checkpoint that exists is complete. Loading needs no pickle.

    One write per iteration, and deletes by name: a checkpoint costs one round trip to
    the store (21% of iteration time on S3 with the earlier files-and-listing layout).
    """

    KEEP = 2

    def __init__(self, root: Location, fingerprint: dict[str, Any]):
        self.root = root
        self.fingerprint = fingerprint
        self._saved: list[int] = []  # iterations written by this process, oldest first

    def _loc(self, iteration: int) -> Location:
        return self.root.join(f"ckpt-{iteration:06d}.npz")

    def save(self, state: KMeansState) -> None:
        doc = {
            "fingerprint": self.fingerprint,
            "iteration": state.iteration,
            "converged": state.converged,
            "history": state.history_dicts(),
            "extra": state.extra,
        }
        arrays = {"centroids": state.centroids, "state": np.array(json.dumps(doc))}
        if state.weight_sums is not None:
            arrays["weight_sums"] = state.weight_sums
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._loc(state.iteration).write_bytes(buf.getvalue())
        if state.iteration not in self._saved:
            self._saved.append(state.iteration)
        while len(self._saved) > self.KEEP:
            self._loc(self._saved.pop(0)).delete()

    def _existing(self) -> list[int]:
        names = (f.url.rsplit("/", 1)[-1] for f in self.root.files([".npz"]))
        return sorted(int(n[5:11]) for n in names if n.startswith("ckpt-") and n[5:11].isdigit())

    def latest(self) -> KMeansState | None:
        """The newest readable checkpoint of this run, or None."""
        existing = self._existing()
        self._saved = existing[-self.KEEP :]
        for iteration in reversed(existing):
            loc = self._loc(iteration)
            try:
                with np.load(io.BytesIO(loc.read_bytes()), allow_pickle=False) as z:
                    arrays = {name: z[name] for name in z.files}
                doc = json.loads(str(arrays["state"]))
            except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
                log.warning("ignoring unreadable checkpoint %s (%s)", loc.url, e)
                continue
            refuse_stale(self.root.url, "checkpoints", doc["fingerprint"], self.fingerprint)
            return KMeansState(
                centroids=arrays["centroids"].astype(np.float32),
                iteration=int(doc["iteration"]),
                weight_sums=arrays.get("weight_sums"),
                history=[IterationRecord(**r) for r in doc["history"]],
                converged=bool(doc["converged"]),
                extra=doc.get("extra", {}),
            )
        return None
