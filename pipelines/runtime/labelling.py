"""Labelling rows: from an embedding matrix and the row's other columns to the output's
columns. One definition, used by both ways a run labels its rows: the streaming pass's
``Labeler`` actors (``stages.label``) and the fit's resident workers, which label the
rows they already hold (``workers.labels``) without reading the input again.

Every row gets ``label`` and ``distance`` (squared L2 to that label's centroid; for
spherical runs the squared distance between unit vectors, 2 - 2 cos, and ``cosine``
beside it), with ``topk`` the M best labels and their distances. With balancing,
``label`` is argmax_j S_ij / eps + log v_j, the balanced label, ``nearest_label`` the
nearest centroid, and ``topk_probs`` the plan's row normalised over the M. Every other
column passes through; the embedding column is dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.assign import CentroidIndex
from pseudolabel.ops.balanced import Assignment, BalancedAssigner
from pseudolabel.ops.gpu import usable_device
from pseudolabel.ops.kmeans import resolve_search
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.io.layout import load_npy
from pseudolabel.pipelines.io.plan import arrow_storage
from pseudolabel.pipelines.io.storage import resolve
from pseudolabel.pipelines.runtime.session import Sizing

# What a labeller can be given for centroids and duals: a URL of a .npy, or the array.
ArraySource = str | np.ndarray


@dataclass(frozen=True)
class LabelSpec:
    metric: str
    topk: int = 0  # M > 0: also the M best labels, distances (and probabilities)
    embedding_column: str = "embedding"
    device: str = "cpu"
    threads: int | None = None  # faiss threads per labeler; None: Ray's OMP_NUM_THREADS
    duals: ArraySource | None = None  # log v (k,): balanced labels
    epsilon: float | None = None  # the plan's eps, in score units
    centroids_sha256: str | None = None  # a centroids URL must hold this file
    search: str = "flat"  # nearest labels: flat, or approx (ops.neighbours)
    seed: int = 0  # of the approx search's cells

    @classmethod
    def of(
        cls,
        config: RunConfig,
        sizing: Sizing,
        duals_url: str | None,
        epsilon: float | None,
        centroids_sha256: str | None = None,
    ) -> LabelSpec:
        return cls(
            metric=config.metric,
            topk=config.topk,
            device=sizing.device,
            threads=sizing.label_threads,
            duals=duals_url,
            epsilon=epsilon,
            centroids_sha256=centroids_sha256,
            search=resolve_search(config.search, config.k),
            seed=config.seed,
        )


def load_array(source: ArraySource, storage_options: dict, sha256: str | None = None) -> np.ndarray:
    if isinstance(source, str):
        return load_npy(resolve(source, storage_options), sha256)
    return np.asarray(source)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, d) from an embedding column: a tensor column, fixed-size or equal-length lists."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arrow_storage(arr)
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, -1) if n else values.reshape(0, 0)


class RowLabeler:
    """The centroids (and duals) loaded once, on the device this process sees.

    Given URLs (as a run does), a labeller that Ray rebuilds loads them from storage
    alone, even after the driver's objects are gone; ``centroids_sha256`` checks that
    the file is still the run's.
    """

    def __init__(self, centroids: ArraySource, spec: LabelSpec, storage_options: dict):
        spec = dataclasses.replace(spec, device=usable_device(spec.device))
        beta = None
        if spec.duals is not None:  # beta = eps log v, in score units
            beta = load_array(spec.duals, storage_options) * spec.epsilon
        self.spec = spec
        self.assigner = BalancedAssigner(
            load_array(centroids, storage_options, spec.centroids_sha256),
            spec.metric,
            beta,
            spec.epsilon,
            spec.device,
            spec.search,
            spec.seed,
        )

    @property
    def exact_index(self) -> CentroidIndex | None:
        """The exact CPU index of plain labels (no duals, no top-M, flat search), which
        a fit's workers may search with their bounds (``ops.bounds.bounded_search``)
        and pass the result to ``label`` as ``nearest``; else None."""
        index = self.assigner.index
        plain = self.spec.duals is None and not self.spec.topk
        cpu = isinstance(index, CentroidIndex) and index.device == "cpu"
        return index if plain and cpu else None

    def label(
        self, x: np.ndarray, table: pa.Table, nearest: tuple[np.ndarray, np.ndarray] | None = None
    ) -> pa.Table:
        """``table`` (the rows' other columns, in the rows' order) with the label
        columns appended. x (n, d): the rows' embeddings. ``nearest``: their labels and
        squared distances, already found with ``exact_index`` (then x is not searched)."""
        spec = self.spec
        if nearest is not None:
            out = Assignment(nearest[0], nearest[1], nearest[0], nearest[1])
        else:
            if spec.metric == "ip":
                x = normalize_rows(x)
            out = self.assigner.assign(x, spec.topk)
        columns = {
            "label": pa.array(out.label.astype(np.int32)),
            "distance": pa.array(out.distance.astype(np.float32)),
        }
        if spec.metric == "ip":  # unit vectors: |x - c|^2 = 2 - 2 cos(x, c)
            columns["cosine"] = pa.array((1 - out.distance / 2).astype(np.float32))
        if spec.duals is not None:
            columns["nearest_label"] = pa.array(out.nearest.astype(np.int32))
        if spec.topk:
            columns["topk_labels"] = _fixed_lists(out.topk_labels.astype(np.int32))
            columns["topk_distances"] = _fixed_lists(out.topk_distances.astype(np.float32))
            if out.topk_probs is not None:
                columns["topk_probs"] = _fixed_lists(out.topk_probs)
        for name, values in columns.items():
            table = table.append_column(name, values)
        return table

    def label_table(self, table: pa.Table) -> pa.Table:
        """``label`` for a table that holds the embedding column, which is dropped."""
        column = self.spec.embedding_column
        return self.label(embedding_matrix(table.column(column)), table.drop_columns([column]))


def _fixed_lists(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])
