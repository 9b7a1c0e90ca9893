"""The label pass: one streaming Ray Data pass from rows to labelled rows.

read -> map_batches(Labeler actor pool) -> write_parquet(staging) for a run, or any Ray
Dataset -> map_batches(Labeler) for ``pseudolabel.label``. Each Labeler loads the
centroids (and the Sinkhorn duals) once and labels batches as ``runtime.labelling``
defines (its docstring lists the columns). A Lloyd run whose workers hold every row
labels there instead (``--label-from``, ``runtime.shards.ResidentShards.write_labels``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pseudolabel.pipelines.config import RunConfig
from pseudolabel.pipelines.errors import ResourceError
from pseudolabel.pipelines.io.plan import Plan, ReadSettings
from pseudolabel.pipelines.io.storage import Location, first_line
from pseudolabel.pipelines.runtime.actors import not_started, step_timeout
from pseudolabel.pipelines.runtime.bookkeeping import as_argument
from pseudolabel.pipelines.runtime.labelling import ArraySource, LabelSpec, RowLabeler
from pseudolabel.pipelines.runtime.roster import join_roster
from pseudolabel.pipelines.runtime.session import Sizing, limit_threads

__all__ = ["LabelPool", "LabelSpec", "Labeler", "label_dataset", "label_pass"]


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


class Labeler:
    """A map_batches actor: a ``runtime.labelling.RowLabeler`` with the labeler pool's
    threads, that reports itself to the run's roster."""

    def __init__(self, centroids: ArraySource, spec: LabelSpec, storage_options: dict, roster=None):
        limit_threads(spec.threads)
        self.rows = RowLabeler(centroids, spec, storage_options)
        join_roster(roster, self.rows.spec.device)  # where the labels are computed

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.rows.label_table(table)


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
    from ray.util.annotations import RayDeprecationWarning

    # Ray 2.60 deprecates ``max_restarts`` among map_batches' keywords (and the per-actor
    # function) with no replacement yet; the warning is Ray's to a user who cannot act.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return _map_labeler(dataset, centroids, spec, pool, storage_options, roster)


def _map_labeler(dataset, centroids, spec, pool, storage_options, roster) -> Any:
    import ray.data

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
    # Ray Data loads here, where a pass needs it (~0.9 s): a run in this process never does.
    import ray.data
    from ray.data.exceptions import ExecutionTimeoutError

    from pseudolabel.pipelines.io.datasource import embedding_dataset

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
