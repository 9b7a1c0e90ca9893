"""The label pass: one streaming Ray Data pass from rows to labelled rows.

read -> map_batches(Labeler actor pool) -> write_parquet(staging) for a run, or any Ray
Dataset -> map_batches(Labeler) for ``pseudolabel.label``. Each Labeler loads the
centroids (and the Sinkhorn duals) once; every row gets ``label`` and ``distance``
(squared L2 to that label's centroid; for spherical runs the squared distance between
unit vectors, 2 - 2 cos, and ``cosine`` beside it), with ``topk`` the M best labels and
their distances. With balancing, ``label`` is argmax_j S_ij / eps + log v_j, the balanced label,
``nearest_label`` the nearest centroid, and ``topk_probs`` the plan's row normalised over
the M. Every other column passes through; the embedding column is dropped.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.exceptions import ExecutionTimeoutError
from ray.util.annotations import RayDeprecationWarning

from pseudolabel.ops.arrays import normalize_rows
from pseudolabel.ops.balanced import BalancedAssigner
from pseudolabel.ops.gpu import usable_device
from pseudolabel.ops.kmeans import resolve_search
from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ResourceError
from pseudolabel.pipelines.io.datasource import embedding_dataset
from pseudolabel.pipelines.io.layout import load_npy
from pseudolabel.pipelines.io.plan import Plan, ReadSettings, arrow_storage
from pseudolabel.pipelines.io.storage import Location, first_line, resolve
from pseudolabel.pipelines.runtime.actors import not_started, step_timeout
from pseudolabel.pipelines.runtime.bookkeeping import as_argument
from pseudolabel.pipelines.runtime.roster import join_roster
from pseudolabel.pipelines.runtime.session import Sizing, limit_threads

# What a Labeler can be given for centroids and duals: a URL of a .npy, or the array.
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


@dataclass(frozen=True)
class LabelPool:
    size: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_rows: int = 65536
    startup_timeout: float = 600.0  # seconds for the whole pool to start
    max_restarts: int = 3  # times each labeler is rebuilt before the pass fails
    task_timeout: float = 0.0  # seconds without progress before the pass fails; 0: auto
    k: int = 0  # centres, for the automatic bound

    @classmethod
    def of(cls, config: RunConfig, sizing: Sizing) -> LabelPool:
        return cls(
            sizing.label_workers,
            config.cpus_per_worker,
            config.gpus_per_worker,
            config.label_batch_rows,
            config.startup_timeout,
            config.max_restarts,
            config.task_timeout,
            config.k,
        )

    def stall_timeout(self, dim: int) -> float:
        """Seconds the pass may make no progress (no batch labelled, none moved): one
        batch's bound (``runtime.actors.step_timeout``), and never less than the pool's
        start-up allowance, which is waited for first."""
        step = step_timeout(self.task_timeout, self.batch_rows, self.k, dim)
        return max(step, self.startup_timeout)


def _load(source: ArraySource, storage_options: dict, sha256: str | None = None) -> np.ndarray:
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


class Labeler:
    """A map_batches actor that loads the centroids (and duals) once.

    Given URLs (as a run does), an actor that Ray restarts rebuilds from storage alone,
    even after the driver's objects are gone.
    """

    def __init__(self, centroids: ArraySource, spec: LabelSpec, storage_options: dict, roster=None):
        limit_threads(spec.threads)
        spec = dataclasses.replace(spec, device=usable_device(spec.device))
        beta = None
        if spec.duals is not None:  # beta = eps log v, in score units
            beta = _load(spec.duals, storage_options) * spec.epsilon
        self.spec = spec
        self.assigner = BalancedAssigner(
            _load(centroids, storage_options, spec.centroids_sha256),
            spec.metric,
            beta,
            spec.epsilon,
            spec.device,
            spec.search,
            spec.seed,
        )
        join_roster(roster, self.assigner.device)  # where the labels are computed

    def __call__(self, table: pa.Table) -> pa.Table:
        spec = self.spec
        x = embedding_matrix(table.column(spec.embedding_column))
        if spec.metric == "ip":
            x = normalize_rows(x)
        out = self.assigner.assign(x, spec.topk)
        table = table.drop_columns([spec.embedding_column])
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


def _fixed_lists(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])


def label_dataset(
    dataset: Any,
    centroids: ArraySource,
    spec: LabelSpec,
    pool: LabelPool,
    storage_options: dict | None = None,
    roster: Any = None,
) -> Any:
    """The lazy Dataset of ``dataset``'s rows with their labels (``Labeler``); each
    labeler reports itself to ``roster`` (``runtime.roster``) when given one."""
    # Ray 2.60 deprecates ``max_restarts`` among map_batches' keywords (and the per-actor
    # function) with no replacement yet; the warning is Ray's to a user who cannot act.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return _map_labeler(dataset, centroids, spec, pool, storage_options, roster)


def _map_labeler(dataset, centroids, spec, pool, storage_options, roster) -> Any:
    return dataset.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "centroids": centroids,
            "spec": spec,
            "storage_options": storage_options or {},
            "roster": as_argument(roster),
        },
        batch_size=pool.batch_rows,
        batch_format="pyarrow",
        # min_size = max_size: an autoscaling GPU pool can otherwise stay at one actor
        # (ray#59144).
        compute=ray.data.ActorPoolStrategy(min_size=pool.size, max_size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        # Ray Data rebuilds a dead labeler without end by default: a labeler that keeps
        # dying (a batch it cannot hold in memory) would loop forever.
        max_restarts=pool.max_restarts,
    )


def label_pass(
    plan: Plan,
    settings: ReadSettings,
    centroids: Location,
    spec: LabelSpec,
    pool: LabelPool,
    staging: Location,
    ledger=None,
    roster=None,
) -> None:
    """Label every input row into parquet files under ``staging``. A pool that cannot
    start within ``pool.startup_timeout`` is a ResourceError, not a wait without end
    (Ray Data waits for its actors forever by default)."""
    # A Dataset takes a copy of the current DataContext when it is made: set it first.
    context = ray.data.DataContext.get_current()
    saved = context.wait_for_min_actors_s, context.execution_no_progress_timeout_s
    context.wait_for_min_actors_s = max(1, math.ceil(pool.startup_timeout))
    # A labeler that stops answering (a frozen host) stalls the pass: Ray Data ends an
    # execution that makes no progress for this long (its default: 30 minutes).
    stall = pool.stall_timeout(plan.dim)
    context.execution_no_progress_timeout_s = stall
    try:
        dataset = embedding_dataset(plan, settings, ledger=ledger)
        labelled = label_dataset(
            dataset, centroids.url, spec, pool, settings.storage_options, roster
        )
        labelled.write_parquet(staging.path, filesystem=staging.arrow_fs())
    except ExecutionTimeoutError as e:
        raise ResourceError(
            f"the label pass made no progress for {stall:g} s (--task-timeout): a labeler "
            "or a node may have stopped responding; the fit is checkpointed, rerun to "
            "label again"
        ) from e
    except ray.exceptions.ActorDiedError as e:
        raise ResourceError(
            f"labelers died more than --max-restarts {pool.max_restarts} times "
            f"({first_line(e)}); the fit is checkpointed: rerun to label again, with "
            "smaller --label-batch-rows if they ran out of memory"
        ) from e
    except ray.exceptions.GetTimeoutError as e:
        raise not_started(
            f"the {pool.size} labelers",
            pool.startup_timeout,
            pool.num_cpus,
            pool.num_gpus,
            "--label-workers",
        ) from e
    finally:
        context.wait_for_min_actors_s, context.execution_no_progress_timeout_s = saved
