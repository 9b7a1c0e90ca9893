"""The label pass: one streaming Ray Data pass from shards to labelled parquet.

read (EmbeddingDatasource) -> map_batches(Labeler actor pool) -> write_parquet(staging).
Each Labeler loads the centroids (and the Sinkhorn duals) once; every row gets
``label`` and ``distance`` (squared L2 to that label's centroid; for spherical runs the
squared distance between unit vectors, 2 - 2 cos), with ``topk`` the M best labels and
their distances. With balancing, ``label`` is argmax_j S_ij / eps + log v_j, the
balanced label, ``nearest_label`` the nearest centroid, and ``topk_probs`` the plan's row
normalised over the M. The staged files are then read back for counts only.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from ops.assign import normalize_rows
from ops.balanced import BalancedAssigner
from pipelines.cluster import limit_threads
from pipelines.datasource import embedding_dataset
from pipelines.errors import InputError
from pipelines.output import load_npy
from pipelines.reader import Plan, ReadSettings
from pipelines.storage import Location, resolve


@dataclass(frozen=True)
class LabelSpec:
    metric: str
    topk: int
    id_type: str
    truth_column: str | None = None
    device: str = "cpu"
    threads: int | None = None  # faiss threads per labeler; None: Ray's OMP_NUM_THREADS
    duals_url: str | None = None  # duals.npy (log v): balanced labels
    epsilon: float | None = None  # the plan's eps, in score units


class Labeler:
    """A map_batches actor that loads the centroids once, from storage.

    Reading ``centroids.npy`` (rather than taking an ObjectRef) means an actor that Ray
    restarts rebuilds from storage alone, even after the driver's objects are gone.
    """

    def __init__(self, centroids_url: str, storage_options: dict, spec: LabelSpec):
        limit_threads(spec.threads)
        centroids = load_npy(resolve(centroids_url, storage_options))
        beta = None
        if spec.duals_url:  # beta = eps log v, in score units
            beta = load_npy(resolve(spec.duals_url, storage_options)) * spec.epsilon
        self.spec = spec
        self.assigner = BalancedAssigner(centroids, spec.metric, beta, spec.epsilon, spec.device)
        self.id_type = _arrow_type(spec.id_type)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        x = batch["embedding"]
        if self.spec.metric == "ip":
            x = normalize_rows(x)
        out = self.assigner.assign(x, self.spec.topk)
        columns = {
            "id": pa.array(batch["id"]).cast(self.id_type),
            "label": pa.array(out.label.astype(np.int32)),
            "distance": pa.array(out.distance.astype(np.float32)),
        }
        if self.spec.duals_url:
            columns["nearest_label"] = pa.array(out.nearest.astype(np.int32))
        if self.spec.topk:
            columns["topk_labels"] = _fixed_lists(out.topk_labels.astype(np.int32))
            columns["topk_distances"] = _fixed_lists(out.topk_distances.astype(np.float32))
            if out.topk_probs is not None:
                columns["topk_probs"] = _fixed_lists(out.topk_probs)
        if self.spec.truth_column:
            columns[self.spec.truth_column] = pa.array(batch[self.spec.truth_column])
        return pa.table(columns)


def _fixed_lists(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])


def _arrow_type(name: str) -> pa.DataType:
    return {"string": pa.string(), "large_string": pa.string()}.get(name) or pa.type_for_alias(name)


@dataclass(frozen=True)
class LabelPool:
    size: int
    num_cpus: float
    num_gpus: float
    batch_rows: int


def label_pass(
    plan: Plan,
    settings: ReadSettings,
    centroids: Location,
    spec: LabelSpec,
    pool: LabelPool,
    staging: Location,
) -> None:
    """Label every input row into parquet files under ``staging``."""
    dataset = embedding_dataset(plan, settings)
    labelled = dataset.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "centroids_url": centroids.url,
            "storage_options": settings.storage_options,
            "spec": spec,
        },
        batch_size=pool.batch_rows,
        batch_format="numpy",
        # min_size = max_size: an autoscaling GPU pool can otherwise stay at one actor
        # (ray#59144).
        compute=ray.data.ActorPoolStrategy(min_size=pool.size, max_size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )
    labelled.write_parquet(staging.path, filesystem=staging.arrow_fs())


@dataclass
class LabelCounts:
    rows: int
    sizes: np.ndarray  # (k,) rows per label
    contingency: dict[tuple[int, object], int]  # (label, truth) -> rows, with a truth column
    distance_sum: float = 0.0  # the objective of the final centroids over the labelled rows

    def truth_table(self) -> np.ndarray:
        """(k, C) counts of rows per (label, truth class), classes in sorted order."""
        classes = sorted({t for _, t in self.contingency}, key=str)
        column = {t: j for j, t in enumerate(classes)}
        table = np.zeros((len(self.sizes), len(classes)), np.int64)
        for (label, truth), count in self.contingency.items():
            table[label, column[truth]] += count
        return table


def count_labels(
    files: list[Location],
    k: int,
    columns: tuple[str, ...] = ("label",),
    truth_column: str | None = None,
) -> dict[str, LabelCounts]:
    """Counts per label (and per label x truth pair) of each label column, over the
    written label files.

    Reads only the small columns (4 bytes per row each), in driver threads: starting Ray
    workers for this cost more than the reading (5.7 s against 0.02 s, 100k rows).
    """
    totals = {c: LabelCounts(0, np.zeros(k, np.int64), Counter()) for c in columns}
    with ThreadPoolExecutor(max_workers=16) as pool:
        parts = pool.map(lambda f: _count_file(f, k, columns, truth_column), files)
    for part in parts:
        for column, (rows, sizes, pairs, distance) in part.items():
            total = totals[column]
            total.rows += rows
            total.sizes += sizes
            total.contingency.update(pairs)
            total.distance_sum += distance
    for total in totals.values():
        total.contingency = dict(total.contingency)
    return totals


def _count_file(loc: Location, k: int, columns: tuple[str, ...], truth_column: str | None):
    wanted = [*columns, "distance"] + ([truth_column] if truth_column else [])
    table = read_columns(loc, wanted)
    truths = table.column(truth_column).to_pylist() if truth_column else None
    distance = float(table.column("distance").to_numpy().sum(dtype=np.float64))
    out = {}
    for column in columns:
        labels = table.column(column).to_numpy()
        pairs: Counter = Counter()
        if truths is not None:
            pairs.update(zip(labels.tolist(), truths, strict=True))
        out[column] = (len(labels), np.bincount(labels, minlength=k), pairs, distance)
    return out


def drop_duplicate_ids(files: list[Location], on_bad_rows: str) -> int:
    """Find ids that occur more than once in the staged label files (before publish).

    ``error``: an InputError with examples. ``skip``: the later occurrences (in file,
    then row order) are dropped by rewriting the affected files; returns their count.
    """
    columns = [t.column("id") for t in read_label_columns(files, ["id"])]
    if not columns:
        return 0
    ids = pa.concat_arrays([c.combine_chunks() for c in columns])
    values = ids.to_numpy(zero_copy_only=False)
    _, first = np.unique(values, return_index=True)
    if len(first) == len(values):
        return 0
    keep = np.zeros(len(values), bool)
    keep[first] = True
    dropped = int((~keep).sum())
    if on_bad_rows != "skip":
        examples = sorted({str(v) for v in values[~keep][:5]})
        raise InputError(
            f"duplicate ids: {dropped} rows repeat an id already seen (e.g. {examples}); "
            "use --on-bad-rows skip to keep the first occurrence of each"
        )
    start = 0
    for f, column in zip(files, columns, strict=True):
        mask = keep[start : start + len(column)]
        start += len(column)
        if not mask.all():
            with f.open() as fh:
                table = pq.read_table(fh)
            with f.open("wb") as fh:
                pq.write_table(table.filter(pa.array(mask)), fh)
    return dropped


def read_columns(loc: Location, columns: list[str]) -> pa.Table:
    """Some columns of one parquet file."""
    with loc.open() as f:
        return pq.read_table(f, columns=columns)


def read_label_columns(files: list[Location], columns: list[str]) -> list[pa.Table]:
    """``columns`` of every label file, one table per file in order, read in driver
    threads (the small columns only: a Ray pass would cost more to start)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda f: read_columns(f, columns), files))
